"""The HTTP listener: uvicorn (httptools parser) on the server's own event loop.

uvicorn serves :class:`~tlserve.server.edge.rest.routes.RestApp` as one more
task on the loop gRPC runs on (uvloop's when installed): no second thread
or loop, the same core and batchers. The socket is bound here first, so a
taken port fails the start with the same ``OSError`` as gRPC's, and the
port is known before anything is served. tlserve's lifecycle owns SIGTERM
(uvicorn's own signal handling is off); :meth:`RestListener.stop` closes the
socket, closes idle keep-alive connections and gives calls in flight
``grace`` seconds.

Limits the parser enforces before the application sees a request: the
request line and headers together at most :data:`MAX_HEADER_BYTES`
(431-class refusals answered 400 by uvicorn), and an idle keep-alive
connection is closed after :data:`KEEP_ALIVE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tlserve.server.config import ServerConfig
from tlserve.server.edge.rest.routes import RestApp

__all__ = ["KEEP_ALIVE_S", "MAX_HEADER_BYTES", "RestListener"]

log = logging.getLogger(__name__)

#: The request line and headers of one request, together (nginx's default
#: large_client_header_buffers is 4 x 8 KiB; a bearer token and a few headers fit).
MAX_HEADER_BYTES = 32 * 1024
KEEP_ALIVE_S = 75  # longer than common load balancers' idle timeouts (60 s)
#: Connections and requests in progress at once; more are answered 503 by uvicorn.
MAX_CONNECTIONS = 4096


class _FewWarnings(logging.Filter):
    """uvicorn's WARNINGs (one per malformed request) at most once a second, as
    the gRPC edge logs refused requests: hostile input cannot flood the log."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + 1.0
        return True


_UVICORN_LOG = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _FewWarnings) for f in _UVICORN_LOG.filters):
    _UVICORN_LOG.addFilter(_FewWarnings())


class _BoundedHeaders(HttpToolsProtocol):
    """httptools with a bound on header bytes (llhttp itself has none)."""

    def on_message_begin(self) -> None:
        self._header_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes = getattr(self, "_header_bytes", 0) + size
        if self._header_bytes > MAX_HEADER_BYTES:
            # Raised inside the parser's callback: uvicorn answers 400 and closes.
            raise ValueError(f"request headers over {MAX_HEADER_BYTES} bytes")


class _Embedded(uvicorn.Server):
    """uvicorn without its signal handlers: tlserve's lifecycle owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RestListener:
    """The HTTP port: bind with :meth:`start`, close with :meth:`stop`."""

    def __init__(self, app: RestApp, config: ServerConfig) -> None:
        self._app = app
        self._config = config
        self.port = 0
        self._server: _Embedded | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self._config
        sock = _bind(config.host, config.http_port)
        self.port = int(sock.getsockname()[1])
        uvicorn_config = uvicorn.Config(
            self._app,
            http=_BoundedHeaders,
            loop="none",
            lifespan="off",
            ws="none",
            interface="asgi3",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,  # no X-Forwarded-For rewriting: nothing here reads the peer
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=max(1, int(config.grace)),
            limit_concurrency=MAX_CONNECTIONS,
            **_tls(config),
        )
        self._server = _Embedded(uvicorn_config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP listener on port {self.port} stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket with Nagle off: its connections answer in two writes
    (head, body), which Nagle's algorithm and the caller's delayed ACK hold for
    40 ms. asyncio turns it off itself only on sockets made with proto TCP."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _tls(config: ServerConfig) -> dict[str, Any]:
    """TLS, and mutual TLS with a client CA, as the gRPC port has it (same files)."""
    if not (config.tls_cert and config.tls_key):
        return {}
    options: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        options.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
