"""EVP_RESULT codes as exceptions, as upstream's ``evp.app.exceptions`` (PYTHON-SDK.md §3)."""

from . import _backend as codes

#: Code → exception class, filled by ``register``.
exception_registry = {}


def register(code):
    """Class decorator: ``code`` raises the decorated class."""

    def decorate(cls):
        exception_registry[code] = cls
        return cls

    return decorate


def get_exception(code):
    """The class registered for ``code``, else ``ErrorBase``."""
    return exception_registry.get(code, ErrorBase)


class ErrorBase(Exception):
    """The root of every SDK error."""


@register(codes.EVP_SHOULDEXIT)
class ShouldExit(ErrorBase):
    """The agent asked the module to exit (or the connection to it is gone)."""


@register(codes.EVP_TIMEDOUT)
class TimedOut(ErrorBase):
    """No event, or no answer, in time."""


@register(codes.EVP_ERROR)
class UnknownError(ErrorBase):
    """EVP_ERROR."""


@register(codes.EVP_INVAL)
class Invalid(ErrorBase):
    """EVP_INVAL."""


@register(codes.EVP_NOMEM)
class NoMem(ErrorBase):
    """EVP_NOMEM."""


@register(codes.EVP_TOOBIG)
class TooBig(ErrorBase):
    """EVP_TOOBIG."""


@register(codes.EVP_AGAIN)
class Again(ErrorBase):
    """EVP_AGAIN: try again once events were processed."""


@register(codes.EVP_AGENT_PROTOCOL_ERROR)
class AgentProtocolError(ErrorBase):
    """EVP_AGENT_PROTOCOL_ERROR."""


@register(codes.EVP_EXIST)
class Exist(ErrorBase):
    """EVP_EXIST."""


@register(codes.EVP_FAULT)
class Fault(ErrorBase):
    """EVP_FAULT."""


@register(codes.EVP_DENIED)
class Denied(ErrorBase):
    """EVP_DENIED."""


@register(codes.EVP_NOTSUP)
class NotSupported(ErrorBase):
    """EVP_NOTSUP."""
