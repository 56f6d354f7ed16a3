"""The remote SDK socket protocol (docs/sdk-wire.md), spoken in Python.

One connection to the instance's socket; each request is a 16-byte header (payload size,
zero, xid) and a FlatBuffers ``Request``; the agent answers each with a ``Response`` carrying
the same xid, one request at a time. The tables are ``sdk_generated.py``, made by flatc from
``schemas/sdk.fbs``.
"""

import os
import socket
import struct
import time

import flatbuffers

from . import _backend as codes
from . import sdk_generated as fb

#: The header: payload size, a zero word, the request id (little-endian, as on every target).
HEADER = struct.Struct("<IIQ")
#: The largest payload either side sends (the agent refuses more with EVP_TOOBIG).
MAX_PAYLOAD = 131072
#: How long a request waits for its answer before EVP_TIMEDOUT, as the C SDK.
CALL_TIMEOUT_S = 30.0
#: The first request id, as the C SDK.
FIRST_XID = 1000

DEFAULT_SOCKET = "/evp/sdk.sock"
ENV_SOCKET = "EVP_MODULE_SDK_SOCKET_PATH"


class WireError(Exception):
    """The connection failed or the agent answered something this SDK cannot read."""


class Event:
    """One event off ``getEvent``: ``kind`` is an ``fb.EventBody`` value, the rest its fields."""

    def __init__(self, kind, **fields):
        self.kind = kind
        self.__dict__.update(fields)

    def __repr__(self):
        return "Event(%r, %r)" % (self.kind, self.__dict__)


class Connection:
    """A connection to the instance's SDK socket."""

    def __init__(self, path=None):
        self.path = path or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self.xid = FIRST_XID

    def close(self):
        self.sock.close()

    # -- framing -------------------------------------------------------------------------

    def _recv_exact(self, n):
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise WireError("the agent closed the SDK socket")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def call(self, payload, timeout=CALL_TIMEOUT_S):
        """Sends one request and returns the ``Response`` table answering it; ``None`` when
        the answer did not come within ``timeout`` seconds."""
        if len(payload) > MAX_PAYLOAD:
            return _simple_response(codes.EVP_TOOBIG)
        self.xid += 1
        xid = self.xid
        try:
            self.sock.sendall(HEADER.pack(len(payload), 0, xid) + bytes(payload))
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.sock.settimeout(remaining)
                try:
                    size, zero, got = HEADER.unpack(self._recv_exact(HEADER.size))
                    body = self._recv_exact(size)
                except socket.timeout:
                    return None
                finally:
                    self.sock.settimeout(None)
                if zero != 0 or size == 0 or size > MAX_PAYLOAD:
                    raise WireError("malformed answer header")
                if got == xid:
                    return fb.Response.GetRootAs(body, 0)
                # An answer to a request given up on earlier: not ours.
        except OSError as e:
            raise WireError("SDK socket I/O: %s" % e) from e


def _simple_response(result):
    b = flatbuffers.Builder(32)
    fb.SimpleStart(b)
    fb.SimpleAddResult(b, result)
    simple = fb.SimpleEnd(b)
    fb.ResponseStart(b)
    fb.ResponseAddBodyType(b, fb.ResponseUnion.simple)
    fb.ResponseAddBody(b, simple)
    b.Finish(fb.ResponseEnd(b))
    return fb.Response.GetRootAs(b.Output(), 0)


def _request(b, kind, body):
    fb.RequestStart(b)
    fb.RequestAddBodyType(b, kind)
    fb.RequestAddBody(b, body)
    b.Finish(fb.RequestEnd(b))
    return b.Output()


def _bytes(b, data):
    return b.CreateByteVector(bytes(data))


def simple_result(response):
    """The EVP_RESULT of a ``simple`` answer; EVP_AGENT_PROTOCOL_ERROR for anything else."""
    if response is None:
        return codes.EVP_TIMEDOUT
    if response.BodyType() != fb.ResponseUnion.simple:
        return codes.EVP_AGENT_PROTOCOL_ERROR
    simple = fb.Simple()
    table = response.Body()
    simple.Init(table.Bytes, table.Pos)
    return simple.Result()


def request_resend_config():
    b = flatbuffers.Builder(32)
    fb.RequestResendConfigStart(b)
    return _request(b, fb.RequestUnion.requestResendConfig, fb.RequestResendConfigEnd(b))


def send_state(topic, blob, cb):
    b = flatbuffers.Builder(64 + len(topic) + len(blob))
    t = b.CreateString(topic)
    v = _bytes(b, blob)
    fb.StateInputStart(b)
    fb.StateInputAddTopic(b, t)
    fb.StateInputAddBlob(b, v)
    fb.StateInputAddCb(b, cb)
    fb.StateInputAddCbUserdata(b, 0)
    return _request(b, fb.RequestUnion.sendState, fb.StateInputEnd(b))


def send_telemetry(entries, cb):
    b = flatbuffers.Builder(256)
    made = []
    for key, value in entries:
        k = b.CreateString(key)
        v = b.CreateString(value)
        fb.TelemetryEntryStart(b)
        fb.TelemetryEntryAddKey(b, k)
        fb.TelemetryEntryAddValue(b, v)
        made.append(fb.TelemetryEntryEnd(b))
    fb.TelemetryInputStartEntriesVector(b, len(made))
    for entry in reversed(made):
        b.PrependUOffsetTRelative(entry)
    vector = b.EndVector()
    fb.TelemetryInputStart(b)
    fb.TelemetryInputAddEntries(b, vector)
    fb.TelemetryInputAddCb(b, cb)
    fb.TelemetryInputAddCbUserdata(b, 0)
    return _request(b, fb.RequestUnion.sendTelemetry, fb.TelemetryInputEnd(b))


def send_rpc_response(rpc_id, response, status, cb):
    b = flatbuffers.Builder(64 + len(response or ""))
    text = None if response is None else b.CreateString(response)
    fb.RpcResponseInputStart(b)
    fb.RpcResponseInputAddId(b, rpc_id)
    if text is not None:
        fb.RpcResponseInputAddResponse(b, text)
    fb.RpcResponseInputAddStatus(b, status)
    fb.RpcResponseInputAddCb(b, cb)
    fb.RpcResponseInputAddCbUserdata(b, 0)
    return _request(b, fb.RequestUnion.sendRpcResponse, fb.RpcResponseInputEnd(b))


def get_event(deadline_s):
    """A ``getEvent`` until the absolute CLOCK_REALTIME deadline ``deadline_s`` (seconds)."""
    sec = max(0, int(deadline_s))
    nsec = max(0, int((deadline_s - sec) * 1e9)) if deadline_s > 0 else 0
    b = flatbuffers.Builder(48)
    fb.GetEventStart(b)
    fb.GetEventAddTimeoutSec(b, sec)
    fb.GetEventAddTimeoutNsec(b, min(nsec, 999_999_999))
    return _request(b, fb.RequestUnion.getEvent, fb.GetEventEnd(b))


def _table(cls, union_table):
    t = cls()
    t.Init(union_table.Bytes, union_table.Pos)
    return t


def read_event(response):
    """The event of a ``getEvent`` answer; ``Event(NONE)`` when the deadline passed."""
    if response is None or response.BodyType() != fb.ResponseUnion.getEvent:
        raise WireError("the agent answered getEvent with something else")
    event = _table(fb.Event, response.Body())
    kind = event.BodyType()
    body = event.Body()
    K = fb.EventBody
    if kind == K.exit:
        return Event(K.exit)
    if kind == K.NONE or body is None:
        return Event(K.NONE)
    if kind == K.config:
        c = _table(fb.Config, body)
        return Event(kind, topic=_text(c.Topic()), blob=_blob(c))
    if kind == K.rpcRequest:
        r = _table(fb.RpcRequest, body)
        return Event(kind, id=r.Id(), method=_text(r.Method()), params=_text(r.Params()))
    outputs = {
        K.state: fb.StateOutput,
        K.telemetry: fb.TelemetryOutput,
        K.rpcResponse: fb.RpcResponseOutput,
        K.messageSent: fb.MessageSentOutput,
    }
    if kind in outputs:
        o = _table(outputs[kind], body)
        return Event(kind, cb=o.Cb(), reason=o.Reason())
    if kind == K.blob:
        o = _table(fb.BlobOutput, body)
        return Event(kind, cb=o.Cb(), reason=o.Reason())
    # Messages between instances are not part of the Python SDK (as upstream): dropped.
    return Event(kind)


def _text(raw):
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


def _blob(config):
    """The bytes of ``Config.blob`` (slot 1, vtable offset 6), sliced out in one piece."""
    tab = config._tab
    o = flatbuffers.number_types.UOffsetTFlags.py_type(tab.Offset(6))
    if o == 0:
        return b""
    start = tab.Vector(o)
    return bytes(tab.Bytes[start : start + tab.VectorLen(o)])
