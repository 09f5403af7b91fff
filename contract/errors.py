"""Every error tlserve raises, on both sides of the wire, in one tree.

Each error carries the gRPC status code it travels as. The server raises them
from its core and one decorator (``tlserve.server.edge.handling``) turns them into
``context.abort``; the client turns a received ``grpc.RpcError`` back into the
same class with :func:`from_rpc_error`, chained ``from`` the original so
nothing is lost. The CLI maps each class to an exit code
(``tlserve.cli.remote``)::

    TlserveError
    ├── ModelNotFound      NOT_FOUND           unknown model or version
    ├── InvalidInput       INVALID_ARGUMENT    wrong shape, dtype, size, undecodable image
    │   ├── ConfigError                        a bad setting (flag, env var, config value)
    │   └── DataError                          a training folder tlserve cannot use
    ├── NotAllowed         FAILED_PRECONDITION the server's mode forbids the call
    ├── Overloaded         RESOURCE_EXHAUSTED  queue full: retry later (``retry_after`` s)
    ├── DeadlineExceeded   DEADLINE_EXCEEDED   the caller's deadline passed
    ├── Unavailable        UNAVAILABLE         not ready, draining, or unreachable
    ├── Unauthenticated    UNAUTHENTICATED     missing or wrong credentials
    ├── Unimplemented      UNIMPLEMENTED       no such method on this server
    └── ServerError        INTERNAL (and any code not above)
        ├── ProviderError                      an execution provider cannot run the model
        └── ExportError                        an exported model failed its own check

Over HTTP (the KServe v2 REST edge) each code travels as the HTTP status in
:data:`HTTP_STATUS` (:func:`http_status`), with the same message; the retry
hint also as a ``Retry-After`` header in whole seconds.

The retry hint and the deadline a refused call still had have one unit,
seconds (``Overloaded.retry_after``, ``DeadlineExceeded.seconds_left``);
they travel as integer milliseconds in the ``retry-after-ms`` and
``deadline-left-ms`` trailing metadata (HTTP headers on the REST edge), and
:func:`error_trailer` / :func:`from_rpc_error` are the only two places that
convert.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

__all__ = [
    "DEADLINE_LEFT_KEY",
    "HTTP_STATUS",
    "RETRY_AFTER_KEY",
    "ConfigError",
    "DataError",
    "DeadlineExceeded",
    "ExportError",
    "InvalidInput",
    "ModelNotFound",
    "NotAllowed",
    "Overloaded",
    "ProviderError",
    "ServerError",
    "TlserveError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_trailer",
    "from_rpc_error",
    "from_status_message",
    "http_status",
]

#: Trailing-metadata key of the server's retry hint on RESOURCE_EXHAUSTED:
#: an integer number of milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"
#: Trailing-metadata key on DEADLINE_EXCEEDED when the server refused the call
#: as unable to answer it in time: the milliseconds its deadline still had
#: then. A caller that sent with 2 s and reads 40 here spent the rest before
#: the server took the call up (on its own side of the connection).
DEADLINE_LEFT_KEY = "deadline-left-ms"


class TlserveError(Exception):
    """Base of every tlserve error; ``code`` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class ModelNotFound(TlserveError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidInput(TlserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ConfigError(InvalidInput):
    """A setting is missing or malformed; the message names the key."""


class DataError(InvalidInput):
    """A training data folder or CSV tlserve cannot use."""


class NotAllowed(TlserveError):
    """The call is valid but the server's mode forbids it (e.g. explicit model control)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(TlserveError):
    """The server cannot take the work now. ``retry_after``: its hint in seconds, if any."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class DeadlineExceeded(TlserveError):
    """Not answered in time. ``seconds_left``: what the deadline still had when
    the server refused the call as unable to answer it in time (None: the
    server did not refuse it so, e.g. it expired queued or on the caller's side)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, *args: object, seconds_left: float | None = None) -> None:
        super().__init__(*args)
        self.seconds_left = seconds_left


class Unavailable(TlserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(TlserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(TlserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ServerError(TlserveError):
    code = grpc.StatusCode.INTERNAL


class ProviderError(ServerError):
    """The requested execution provider is missing or failed, and fallback is off."""


class ExportError(ServerError):
    """An exported model failed its own verification; nothing was published."""


_BY_CODE: dict[grpc.StatusCode, type[TlserveError]] = {
    cls.code: cls
    for cls in (
        ModelNotFound,
        InvalidInput,
        NotAllowed,
        Overloaded,
        DeadlineExceeded,
        Unavailable,
        Unauthenticated,
        Unimplemented,
        ServerError,
    )
}


#: The HTTP status each code travels as on the REST edge: google.rpc.Code's
#: documented mapping, except UNIMPLEMENTED (an unknown path: 404, as Triton
#: answers) and CANCELLED (the caller is gone: 499, as nginx logs it).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: TlserveError) -> int:
    """The HTTP status ``exc`` is answered with on the REST edge (500 for any other code)."""
    return HTTP_STATUS.get(exc.code, 500)


def error_trailer(exc: TlserveError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries ``exc``'s retry hint or deadline left (else empty)."""
    if isinstance(exc, Overloaded) and exc.retry_after is not None:
        return ((RETRY_AFTER_KEY, str(max(1, math.ceil(exc.retry_after * 1000)))),)
    if isinstance(exc, DeadlineExceeded) and exc.seconds_left is not None:
        return ((DEADLINE_LEFT_KEY, str(max(0, round(exc.seconds_left * 1000)))),)
    return ()


def from_rpc_error(exc: grpc.RpcError) -> TlserveError:
    """The typed error for a failed call (sync or ``grpc.aio``); raise it ``from exc``.

    An :class:`Overloaded` carries the server's ``retry-after-ms`` trailing
    metadata as ``retry_after`` seconds, a :class:`DeadlineExceeded` its
    ``deadline-left-ms`` as ``seconds_left``.
    """
    code = _called(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
        details = str(exc)
    else:
        details = _called(exc, "details") or ""
    cls = _BY_CODE.get(code, ServerError)
    message = f"{code.name}: {details}"
    if cls is Overloaded:
        return Overloaded(
            message, retry_after=_milliseconds(_called(exc, "trailing_metadata"), RETRY_AFTER_KEY)
        )
    if cls is DeadlineExceeded:
        return DeadlineExceeded(
            message,
            seconds_left=_milliseconds(_called(exc, "trailing_metadata"), DEADLINE_LEFT_KEY),
        )
    return cls(message)


def from_status_message(text: str) -> TlserveError:
    """The typed error for a ``"<STATUS_CODE>: <message>"`` string (stream errors)."""
    name, _, _ = text.partition(":")
    code = grpc.StatusCode.__members__.get(name.strip(), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, ServerError)(text)


def _called(exc: object, method: str) -> Any:
    # grpc.aio's AioRpcError has the Call methods without being a grpc.Call.
    function = getattr(exc, method, None)
    return function() if callable(function) else None


def _milliseconds(metadata: Any, wanted: str) -> float | None:
    for key, value in metadata or ():
        if key == wanted:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None
