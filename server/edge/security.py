"""Transport security and authentication for the gRPC port.

- TLS when ``tls_cert`` and ``tls_key`` are set; with ``tls_client_ca`` too,
  mutual TLS: a client must present a certificate signed by that CA.
- A bearer token (``auth_token`` or ``auth_token_file``) checked by
  :class:`BearerTokenInterceptor` on every call except ``grpc.health.v1.Health``
  and server reflection, which stay open for Kubernetes probes and tooling.
  Clients send metadata ``authorization: Bearer <token>``; the comparison is
  constant-time; a missing or wrong token gets UNAUTHENTICATED.

Bad settings (a missing file, a key without a certificate) fail at start-up
with a :class:`~tlserve.server.config.ConfigError` naming the key.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from tlserve.server.config import ConfigError, ServerConfig

__all__ = [
    "OPEN_SERVICES",
    "BearerTokenInterceptor",
    "load_token",
    "server_credentials",
]

log = logging.getLogger(__name__)

#: Services reachable without a token: probes and discovery.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    _Continuation: TypeAlias = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"TLSERVE_{key.upper()}={path!r} cannot be read: {exc}") from exc
    if not data.strip():
        raise ConfigError(f"TLSERVE_{key.upper()}={path!r} is empty")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS) credentials from the config; None for a plaintext port."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ConfigError(
            "TLS needs both TLSERVE_TLS_CERT and TLSERVE_TLS_KEY (--tls-cert, --tls-key); "
            "TLSERVE_TLS_CLIENT_CA alone does not enable TLS"
        )
    pair = (_read("tls_key", config.tls_key), _read("tls_cert", config.tls_cert))
    client_ca = _read("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_token(config: ServerConfig) -> str | None:
    """The bearer token the server requires, or None when auth is off."""
    if config.auth_token and config.auth_token_file:
        raise ConfigError("set TLSERVE_AUTH_TOKEN or TLSERVE_AUTH_TOKEN_FILE, not both")
    if config.auth_token_file:
        token = _read("auth_token_file", config.auth_token_file).decode().strip()
    else:
        token = config.auth_token.strip()
    if not token:
        return None
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ConfigError("the auth token must be printable with no whitespace")
    return token


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            raw = value.encode() if isinstance(value, str) else value
            scheme, _, credential = raw.partition(b" ")
            return credential.strip() if scheme.lower() == b"bearer" else b""
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health stays open)."""

    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None) -> None:
        self._token = token.encode()
        self._on_denied = on_denied

    async def intercept_service(
        self, continuation: _Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method  # "/package.Service/Method"
        if method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES:
            return await continuation(details)
        credential = _bearer(details.invocation_metadata)
        # compare_digest takes time independent of where the strings differ.
        if credential is not None and hmac.compare_digest(credential, self._token):
            return await continuation(details)
        reason = "missing" if credential is None else "invalid"
        message = (
            "missing credentials: send metadata 'authorization: Bearer <token>'"
            if credential is None
            else "invalid bearer token"
        )
        if self._on_denied is not None:
            self._on_denied(reason)
        handler = await continuation(details)
        return None if handler is None else _denying(handler, message)


def _denying(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as ``handler`` that aborts UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED
    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
