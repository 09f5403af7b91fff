"""The errors tlserve raises, on both sides of the wire.

Each error carries the gRPC status code it travels as. The server raises them
from its core and one decorator turns them into ``context.abort``; the client
turns a received ``grpc.RpcError`` back into the same class with
:func:`from_rpc_error`, chained ``from`` the original so nothing is lost::

    TlserveError
    ├── ModelNotFound      NOT_FOUND          unknown model or version
    ├── InvalidInput       INVALID_ARGUMENT   wrong shape, dtype, size, undecodable image
    ├── Overloaded         RESOURCE_EXHAUSTED queue full: retry later
    ├── DeadlineExceeded   DEADLINE_EXCEEDED  the caller's deadline passed
    ├── Unavailable        UNAVAILABLE        not ready, draining, or unreachable
    ├── Unauthenticated    UNAUTHENTICATED    missing or wrong credentials
    └── ServerError        INTERNAL (and anything else)
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceeded",
    "InvalidInput",
    "ModelNotFound",
    "Overloaded",
    "ServerError",
    "TlserveError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class TlserveError(Exception):
    """Base of every tlserve error; ``code`` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class ModelNotFound(TlserveError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidInput(TlserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(TlserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(TlserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(TlserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(TlserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ServerError(TlserveError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TlserveError]] = {
    cls.code: cls
    for cls in (
        ModelNotFound,
        InvalidInput,
        Overloaded,
        DeadlineExceeded,
        Unavailable,
        Unauthenticated,
        ServerError,
    )
}


def from_rpc_error(exc: grpc.RpcError) -> TlserveError:
    """The typed error for a failed call; raise it ``from exc``."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    cls = _BY_CODE.get(code, ServerError)
    return cls(f"{code.name}: {details}")
