"""The evp.app SDK against a fake agent on a real Unix socket (speaking the wire format with
the generated tables, as sdk-broker does) and blobs against a real HTTP server on loopback.
Run: python3 -m unittest discover -s sdk/python/tests (cargo test runs it, see
tests/tests/python.rs)."""

import http.server
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flatbuffers  # noqa: E402

from evp.app import _backend as codes  # noqa: E402
from evp.app import _wire  # noqa: E402
from evp.app import blob  # noqa: E402
from evp.app import sdk_generated as fb  # noqa: E402
from evp.app.backend import wrap_exceptions  # noqa: E402
from evp.app.client import Client  # noqa: E402
from evp.app.command import CommandBase, CommandResponseStatus  # noqa: E402
from evp.app.configuration import ConfigHandlerBase  # noqa: E402
from evp.app.exceptions import (  # noqa: E402
    Again,
    Denied,
    ErrorBase,
    Exist,
    ShouldExit,
    TooBig,
    get_exception,
)
from evp.app.state import State  # noqa: E402
from evp.app.telemetry import Telemetry  # noqa: E402

HEADER = struct.Struct("<IIQ")


def _response(build_body, kind):
    b = flatbuffers.Builder(128)
    body = build_body(b)
    fb.ResponseStart(b)
    fb.ResponseAddBodyType(b, kind)
    fb.ResponseAddBody(b, body)
    b.Finish(fb.ResponseEnd(b))
    return bytes(b.Output())


def simple(result):
    def build(b):
        fb.SimpleStart(b)
        fb.SimpleAddResult(b, result)
        return fb.SimpleEnd(b)

    return _response(build, fb.ResponseUnion.simple)


def event(kind=fb.EventBody.NONE, make=None):
    def build(b):
        body = make(b) if make else None
        fb.EventStart(b)
        fb.EventAddBodyType(b, kind)
        if body is not None:
            fb.EventAddBody(b, body)
        return fb.EventEnd(b)

    return _response(build, fb.ResponseUnion.getEvent)


def exit_event():
    def make(b):
        fb.ExitStart(b)
        return fb.ExitEnd(b)

    return event(fb.EventBody.exit, make)


def config_event(topic, value):
    def make(b):
        t = b.CreateString(topic)
        v = b.CreateByteVector(value.encode())
        fb.ConfigStart(b)
        fb.ConfigAddTopic(b, t)
        fb.ConfigAddBlob(b, v)
        return fb.ConfigEnd(b)

    return event(fb.EventBody.config, make)


def rpc_event(rpc_id, method, params):
    def make(b):
        m = b.CreateString(method)
        p = b.CreateString(params)
        fb.RpcRequestStart(b)
        fb.RpcRequestAddId(b, rpc_id)
        fb.RpcRequestAddMethod(b, m)
        fb.RpcRequestAddParams(b, p)
        return fb.RpcRequestEnd(b)

    return event(fb.EventBody.rpcRequest, make)


def state_done(cb, reason):
    def make(b):
        fb.StateOutputStart(b)
        fb.StateOutputAddCb(b, cb)
        fb.StateOutputAddReason(b, reason)
        return fb.StateOutputEnd(b)

    return event(fb.EventBody.state, make)


class FakeAgent:
    """Accepts one connection on a socket and answers each request with what ``answer``
    returns for it (a Response payload), keeping every request seen."""

    def __init__(self, answer):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "sdk.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.answer = answer
        self.requests = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            while True:
                head = b""
                while len(head) < HEADER.size:
                    chunk = conn.recv(HEADER.size - len(head))
                    if not chunk:
                        return
                    head += chunk
                size, _, xid = HEADER.unpack(head)
                body = b""
                while len(body) < size:
                    body += conn.recv(size - len(body))
                request = fb.Request.GetRootAs(body, 0)
                self.requests.append(request)
                reply = self.answer(request)
                if reply is None:
                    return
                conn.sendall(HEADER.pack(len(reply), 0, xid) + reply)

    def close(self):
        self.listener.close()
        self.dir.cleanup()


def body_of(request, cls):
    t = cls()
    body = request.Body()
    t.Init(body.Bytes, body.Pos)
    return t


class WithAgent(unittest.TestCase):
    """Each test gets a fake agent whose events come from ``self.events`` (NONE when empty)
    and whose sends are answered ``self.send_result``."""

    def setUp(self):
        self.events = []
        self.send_result = codes.EVP_OK
        self.agent = FakeAgent(self.answer)
        os.environ[_wire.ENV_SOCKET] = self.agent.path

    def tearDown(self):
        self.agent.close()

    def answer(self, request):
        if request.BodyType() == fb.RequestUnion.getEvent:
            if self.events:
                return self.events.pop(0)
            # As sdk-broker: no event, so the answer comes at the deadline.
            g = body_of(request, fb.GetEvent)
            deadline = g.TimeoutSec() + g.TimeoutNsec() / 1e9
            time.sleep(min(2.0, max(0.0, deadline - time.time())))
            return event()
        return simple(self.send_result)

    def sent(self, kind):
        return [r for r in self.agent.requests if r.BodyType() == kind]


class ClientTests(WithAgent):
    def test_configuration_arrives_as_str_and_states_go_out_with_their_completion(self):
        client = Client()
        seen = []
        reasons = []

        class Echo(ConfigHandlerBase):
            def handle(self, topic, config):
                seen.append((topic, config))
                s = State(self.client)
                s.complete = reasons.append
                s.send(topic, config)

        client.config = Echo(client)
        self.assertEqual(len(self.sent(fb.RequestUnion.requestResendConfig)), 1)
        self.assertEqual(seen, [], "a handler ran inside its registration")
        self.events.append(config_event("greeting", "héllo"))
        client.run()
        self.assertEqual(seen, [("greeting", "héllo")])
        (state,) = self.sent(fb.RequestUnion.sendState)
        s = body_of(state, fb.StateInput)
        self.assertEqual(s.Topic(), b"greeting")
        self.assertEqual(_blob_bytes(s), "héllo".encode())
        self.events.append(state_done(s.Cb(), codes.EVP_STATE_CALLBACK_REASON_SENT))
        client.run()
        self.assertEqual(reasons, [0])

    def test_run_dispatches_at_most_one_event_and_returns_none(self):
        client = Client()
        got = []

        class H(ConfigHandlerBase):
            def handle(self, topic, config):
                got.append(topic)

        client.config = H(client)
        self.events += [config_event("a", "1"), config_event("b", "2")]
        self.assertIsNone(client.run())
        self.assertEqual(got, ["a"])
        self.assertIsNone(client.run(50))
        self.assertEqual(got, ["a", "b"])
        started = time.monotonic()
        client.run(50)
        self.assertGreaterEqual(time.monotonic() - started, 0.05)

    def test_an_idle_single_threaded_module_waits_in_the_agent_instead_of_polling(self):
        client = Client()
        started = time.monotonic()
        # The fake agent's own thread is the only other one: stand in for a module alone.
        alone = threading.active_count
        threading.active_count = lambda: 1
        try:
            client.run(300)
        finally:
            threading.active_count = alone
        took = time.monotonic() - started
        self.assertGreaterEqual(took, 0.3)
        self.assertLess(took, 1.5)
        polls = len(self.sent(fb.RequestUnion.getEvent))
        self.assertLessEqual(polls, 3, "%d getEvent for one idle run(300)" % polls)

    def test_exit_comes_out_of_run_as_should_exit_every_time(self):
        client = Client()
        self.events.append(exit_event())
        with self.assertRaises(ShouldExit):
            client.run()
        with self.assertRaises(ShouldExit):
            client.run()

    def test_a_refused_send_raises_the_codes_exception_with_upstreams_message(self):
        client = Client()
        for code, cls in [(codes.EVP_AGAIN, Again), (codes.EVP_TOOBIG, TooBig)]:
            self.send_result = code
            with self.assertRaises(cls) as caught:
                State(client).send("t", "v")
            self.assertEqual(str(caught.exception), "send_state failed with %d" % code)
        with self.assertRaises(TypeError):
            client.backend.send_state("t", "v", "not callable")
        with self.assertRaises(SystemError):
            Telemetry(client).send([("k", 1)])

    def test_telemetry_entries_go_out_in_order(self):
        client = Client()
        Telemetry(client).send([("a", "1"), ("b", '{"x": 2}')])
        (t,) = self.sent(fb.RequestUnion.sendTelemetry)
        t = body_of(t, fb.TelemetryInput)
        entries = [(t.Entries(i).Key(), t.Entries(i).Value()) for i in range(t.EntriesLength())]
        self.assertEqual(entries, [(b"a", b"1"), (b"b", b'{"x": 2}')])

    def test_commands_run_every_matching_class_and_answer_with_the_status_value(self):
        client = Client()
        calls = []

        class Echo(CommandBase):
            def init(self, tag):
                self.tag = tag

            def handle(self, params):
                calls.append((self.tag, self.id, self.name, params))
                self.respond(params, CommandResponseStatus.OK)

            def complete(self, reason):
                pass

        client.commands.register(Echo, pattern="ec", args=("prefix",))
        client.commands.register(Echo, pattern=".*", args=("all",))
        with self.assertRaises(KeyError):
            client.commands.register(Echo, pattern="ec")
        self.events.append(rpc_event(42, "echo", '{"n":1}'))
        client.run()
        self.assertEqual(
            calls, [("prefix", 42, "echo", '{"n":1}'), ("all", 42, "echo", '{"n":1}')]
        )
        answers = [body_of(r, fb.RpcResponseInput) for r in self.sent(fb.RequestUnion.sendRpcResponse)]
        self.assertEqual([(a.Id(), a.Response(), a.Status()) for a in answers], [(42, b'{"n":1}', 0)] * 2)

    def test_an_error_in_a_callback_is_printed_and_the_module_carries_on(self):
        client = Client()

        class Broken(ConfigHandlerBase):
            def handle(self, topic, config):
                raise ValueError("broken handler")

        client.config = Broken(client)
        self.events += [config_event("a", "1")]
        client.run()  # no exception escapes
        self.events.append(exit_event())
        with self.assertRaises(ShouldExit):
            client.run()


def _blob_bytes(state_input):
    n = state_input.BlobLength()
    return bytes(state_input.Blob(i) for i in range(n))


class NoAgentTests(unittest.TestCase):
    def test_no_socket_is_denied_not_a_crash(self):
        os.environ[_wire.ENV_SOCKET] = "/nonexistent/sdk.sock"
        with self.assertRaises(Denied):
            Client()

    def test_codes_map_to_upstreams_classes(self):
        self.assertIs(get_exception(codes.EVP_EXIST), Exist)
        self.assertIs(get_exception(99), ErrorBase)
        quiet = wrap_exceptions(lambda: codes.EVP_AGAIN, whitelist=(codes.EVP_AGAIN,))
        self.assertEqual(quiet(), codes.EVP_AGAIN)


class Store(http.server.BaseHTTPRequestHandler):
    """GET serves ``blobs[path]``; PUT stores the body there; ``/missing`` is a 404."""

    blobs = {}

    def do_GET(self):
        if self.path not in self.blobs:
            self.send_error(404)
            return
        data = self.blobs[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        n = int(self.headers["Content-Length"])
        self.blobs[self.path] = self.rfile.read(n)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class BlobTests(WithAgent):
    def setUp(self):
        super().setUp()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Store)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.work = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.server.shutdown()
        self.work.cleanup()
        super().tearDown()

    def run_until(self, client, done):
        end = time.monotonic() + 10
        while not done and time.monotonic() < end:
            client.run(10)
        self.assertTrue(done, "the transfer did not complete")

    def test_get_into_a_file_and_put_from_a_file_and_from_memory(self):
        client = Client()
        payload = os.urandom(100_000)
        Store.blobs["/in"] = payload
        path = os.path.join(self.work.name, "got")
        outcomes = []

        class Get(blob.BlobOperationGet):
            def complete(self, reason, result):
                outcomes.append((reason, result.result, result.http_status))

        Get(client=client, url=self.base + "/in", stream=blob.BlobFileWriter(client, path)).start()
        self.run_until(client, outcomes)
        self.assertEqual(outcomes[0], (blob.BlobReason.DONE, blob.BlobResult.SUCCESS, 200))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), payload)

        outcomes.clear()

        class Put(blob.BlobOperationPut):
            def complete(self, reason, result):
                outcomes.append((reason, result.result, result.http_status))

        Put(client, self.base + "/out", blob.BlobFileReader(client, path), {}).start()
        self.run_until(client, outcomes)
        self.assertEqual(outcomes[0], (blob.BlobReason.DONE, blob.BlobResult.SUCCESS, 201))
        self.assertEqual(Store.blobs["/out"], payload)

        outcomes.clear()
        data = b"memory " * 5000

        class Memory(blob.BlobMemoryReader):
            def handle(self, size):
                return data[self.pos : self.pos + size]

        Put(client, self.base + "/mem", Memory(client, len(data)), {}).start()
        self.run_until(client, outcomes)
        self.assertEqual(Store.blobs["/mem"], data)

    def test_an_http_error_is_denied_with_its_status(self):
        client = Client()
        outcomes = []

        class Get(blob.BlobOperationGet):
            def complete(self, reason, result):
                outcomes.append((reason, result.result, result.http_status))

        path = os.path.join(self.work.name, "none")
        Get(client=client, url=self.base + "/missing", stream=blob.BlobFileWriter(client, path)).start()
        self.run_until(client, outcomes)
        self.assertEqual(outcomes[0], (blob.BlobReason.DENIED, blob.BlobResult.ERROR_HTTP, 404))


if __name__ == "__main__":
    unittest.main()
