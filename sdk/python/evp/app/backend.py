"""The SDK calls, over the instance's socket (upstream: a SWIG layer over the C remote SDK).

Names and behaviour follow upstream's ``evp.app.backend`` (PYTHON-SDK.md §2.2): every call is
made from the module's main thread; callbacks run only inside ``process_event``.
"""

import enum
import functools
import os
import sys
import time
import traceback

from . import _backend as codes
from . import _wire
from . import sdk_generated as fb
from .exceptions import Denied, ShouldExit, TimedOut, UnknownError, get_exception

__all__ = ["Backend"]


def wrap_exceptions(func=None, whitelist=()):
    """Turns the int result of ``func`` into ``None`` (EVP_OK), the code itself (when in
    ``whitelist``) or the code's exception, raised with ``"<name> failed with <code>"``."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            code = f(*args, **kwargs)
            if code == codes.EVP_OK:
                return None
            if code in whitelist:
                return code
            raise get_exception(code)("%s failed with %d" % (f.__name__.lstrip("_"), code))

        return wrapper

    if func is not None:
        return decorate(func)
    return decorate


def _report_callback_error():
    """A callback raised: its traceback goes to stderr and the module carries on (upstream
    crashes here); ``SystemExit`` still ends the process with its code."""
    exc = sys.exc_info()[1]
    if isinstance(exc, SystemExit):
        raise exc
    traceback.print_exc()


def _text_bytes(value, what):
    """``str`` is sent as UTF-8 (upstream accepts only ``str``); ``bytes`` are accepted too."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError("%s must be str, not %s" % (what, type(value).__name__))


class _ClientMixIn:
    def __init__(self):
        try:
            self._conn = _wire.Connection()
        except OSError as e:
            raise Denied("EVP_initialize failed: cannot connect to the SDK socket: %s" % e) from e
        self._completions = {}
        self._next_cb = 1
        self._config_handler = None
        self._command_handler = None
        # The agent said exit (it says so again to every later getEvent), or the connection
        # is gone: every later process_event raises ShouldExit at once.
        self._exited = False
        self._broken = False

    def _call(self, payload):
        if self._broken:
            return codes.EVP_ERROR
        try:
            return _wire.simple_result(self._conn.call(payload))
        except _wire.WireError:
            self._broken = self._exited = True
            return codes.EVP_ERROR

    def _keep(self, complete):
        cb = self._next_cb
        self._next_cb += 1
        self._completions[cb] = complete
        return cb

    def process_event(self, timeout_ms):
        """Waits up to ``timeout_ms`` (negative: a poll) for one event and dispatches it.
        Raises ``TimedOut`` when none came, ``ShouldExit`` once the agent asked the module to
        exit and nothing is left (or the connection is gone)."""
        if self._exited:
            raise ShouldExit("process_event failed with %d" % codes.EVP_SHOULDEXIT)
        deadline = time.time() + (timeout_ms / 1000.0 if timeout_ms >= 0 else -1.0)
        wait = max(0.0, deadline - time.time()) + _wire.CALL_TIMEOUT_S
        try:
            event = _wire.read_event(self._conn.call(_wire.get_event(deadline), timeout=wait))
        except _wire.WireError:
            self._broken = self._exited = True
            raise ShouldExit("process_event failed with %d" % codes.EVP_SHOULDEXIT) from None
        K = fb.EventBody
        if event.kind == K.NONE:
            raise TimedOut("process_event failed with %d" % codes.EVP_TIMEDOUT)
        if event.kind == K.exit:
            self._exited = True
            raise ShouldExit("process_event failed with %d" % codes.EVP_SHOULDEXIT)
        try:
            self._dispatch(event)
        except BaseException:
            _report_callback_error()
        return None

    def _dispatch(self, event):
        K = fb.EventBody
        if event.kind == K.config:
            if self._config_handler is not None:
                self._config_handler(event.topic, event.blob.decode("utf-8", errors="replace"))
        elif event.kind == K.rpcRequest:
            if self._command_handler is not None:
                self._command_handler(event.id, event.method, event.params)
        elif hasattr(event, "cb"):
            complete = self._completions.pop(event.cb, None)
            if complete is not None:
                complete(event.reason)

    def get_workspace_directory(self, type=codes.EVP_WORKSPACE_TYPE_DEFAULT):
        """The instance's workspace folder, as the agent gave it."""
        return os.environ.get(
            "EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH", "/evp/default_workspace"
        )


class _ConfigurationMixIn:
    def set_configuration_handler(self, handler):
        """Registers ``handler(topic: str, config: str)``; the agent then sends the current
        configuration again, one event per topic."""
        if not callable(handler):
            raise TypeError("handler must be callable")
        if self._config_handler is not None:
            raise UnknownError("set_configuration_handler failed with %d" % codes.EVP_ERROR)
        self._set_configuration_handler(handler)

    @wrap_exceptions
    def _set_configuration_handler(self, handler):
        code = self._call(_wire.request_resend_config())
        if code == codes.EVP_OK:
            self._config_handler = handler
        return code


class _StateMixIn:
    def send_state(self, topic, state, complete):
        """Sends the state ``topic`` = ``state``; ``complete(reason)`` follows as an event."""
        if not callable(complete):
            raise TypeError("complete must be callable")
        self._send_state(topic, state, complete)

    @wrap_exceptions
    def _send_state(self, topic, state, complete):
        blob = _text_bytes(state, "state")
        cb = self._keep(complete)
        code = self._call(_wire.send_state(str(topic), blob, cb))
        if code != codes.EVP_OK:
            self._completions.pop(cb, None)
        return code



class _TelemetryMixIn:
    def send_telemetry(self, entries, complete):
        """Sends ``entries``, a list of ``(key, value)`` tuples of ``str`` (values JSON)."""
        if not callable(complete):
            raise TypeError("complete must be callable")
        if not isinstance(entries, list) or not all(
            isinstance(e, tuple) and len(e) >= 2 and isinstance(e[0], str) and isinstance(e[1], str)
            for e in entries
        ):
            # As upstream, which fails this way in its C conversion.
            try:
                raise RuntimeError("entries must be a list of (str, str) tuples")
            except RuntimeError as cause:
                raise SystemError("send_telemetry: bad entries") from cause
        self._send_telemetry([(e[0], e[1]) for e in entries], complete)

    @wrap_exceptions
    def _send_telemetry(self, entries, complete):
        cb = self._keep(complete)
        code = self._call(_wire.send_telemetry(entries, cb))
        if code != codes.EVP_OK:
            self._completions.pop(cb, None)
        return code



class _CommandMixIn:
    def set_command_handler(self, handler):
        """Registers ``handler(id: int, method: str, params: str)`` for direct commands."""
        if not callable(handler):
            raise TypeError("handler must be callable")
        if self._command_handler is not None:
            # Upstream's C SDK asserts (the process aborts); an error is kinder.
            raise UnknownError("set_command_handler failed with %d" % codes.EVP_ERROR)
        self._command_handler = handler

    def send_command_response(self, id, response, status, complete):
        """Answers command ``id`` with ``response`` (``None``: no text) and ``status``."""
        if not callable(complete):
            raise TypeError("complete must be callable")
        if isinstance(status, enum.Enum):
            status = status.value
        self._send_command_response(id, response, status, complete)

    @wrap_exceptions
    def _send_command_response(self, id, response, status, complete):
        text = None if response is None else _text_bytes(response, "response").decode("utf-8")
        cb = self._keep(complete)
        code = self._call(_wire.send_rpc_response(int(id), text, int(status), cb))
        if code != codes.EVP_OK:
            self._completions.pop(cb, None)
        return code



class _MessageMixIn:
    """Not part of ``Backend``, as upstream: Python modules have no messaging."""

    def send_message(self, *args, **kwargs):
        raise NotImplementedError("messages are not available to Python modules")

    def set_message_callback(self, *args, **kwargs):
        raise NotImplementedError("messages are not available to Python modules")


class _StreamMixIn:
    """Not part of ``Backend``, as upstream."""

    def stream_open(self, *args, **kwargs):
        raise NotImplementedError("streams are not available to Python modules")


class _BlobOperationMixIn:
    """Not part of ``Backend``, as upstream: ``evp.app.blob`` moves blobs itself."""

    def blob_operation(self, *args, **kwargs):
        raise NotImplementedError("use evp.app.blob")


class Backend(_ClientMixIn, _ConfigurationMixIn, _StateMixIn, _TelemetryMixIn, _CommandMixIn):
    """The connection to the agent and every SDK call a Python module makes."""
