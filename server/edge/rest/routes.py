"""The KServe v2 REST endpoints and the page, as one raw ASGI application.

Like the gRPC servicers, each handler only decodes the request, calls the
core (:class:`~tlserve.server.core.inference.InferenceCore`) or the control
plane, and encodes the answer; :meth:`RestApp.__call__` does what the gRPC
edge's interceptors and ``handled`` do: routing, the bearer token, the
inference bound (before the body is read), the deadline (the ``Timeout``
header, in seconds), errors as HTTP status codes with the gRPC messages
(:func:`tlserve.contract.errors.http_status`), and counting each inference
call in the same metrics with its own ``api`` label.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from tlserve.contract.errors import (
    DeadlineExceeded,
    InvalidInput,
    TlserveError,
    Unauthenticated,
    http_status,
)
from tlserve.server.core.control import ModelControl
from tlserve.server.core.inference import InferenceCore
from tlserve.server.edge.admission import InferenceAdmission
from tlserve.server.edge.handling import details, record, refused
from tlserve.server.edge.rest.exchange import (
    BodyTimeout,
    ClientGone,
    Exchange,
    PayloadTooLarge,
    Receive,
    Scope,
    Send,
)
from tlserve.server.edge.rest.handlers import Handlers
from tlserve.server.metrics import outcome_of

__all__ = ["API_CLASSIFY", "API_INFER", "TIMEOUT_HEADER", "RestApp"]

log = logging.getLogger(__name__)

#: The ``api`` label of REST inference calls in tlserve_requests_total and
#: tlserve_request_duration_seconds (gRPC's are the method names).
API_INFER = "RestModelInfer"
API_CLASSIFY = "RestClassify"
#: The request header that carries the caller's deadline, in seconds from sending.
TIMEOUT_HEADER = "timeout"
_TOKEN_COOKIE = "tlserve_token"
_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"

Handler = Callable[[Handlers, Exchange], Awaitable[None]]


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    api: str | None = None  # an inference call: admitted, counted, given the body limit
    open: bool = False  # reachable without the token (probes, the page's own files)


class RestApp:
    """The ASGI application; see the module docstring."""

    def __init__(
        self,
        core: InferenceCore,
        control: ModelControl,
        admission: InferenceAdmission,
        *,
        token: str | None,
        on_denied: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.core = core
        self.handlers = Handlers(core, control)
        self.admission = admission
        self._token = token.encode() if token else None
        self._on_denied = on_denied

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; no websockets
        exchange = Exchange(scope, receive, send)
        route = _match(exchange)
        if route is None:
            allowed = _allowed(scope["path"])
            status, why = (405, "method not allowed") if allowed else (404, "no such endpoint")
            error = InvalidInput(f"{why}: {exchange.method} {scope['path'][:200]}")
            await exchange.error(status, error, str(error))
            return
        started, outcome = time.perf_counter(), outcome_of(None)
        name = exchange.params.get("name", "")
        refused_on_arrival = False  # then the admission counted it (as gRPC's refusals)
        try:
            self._authenticate(exchange, route)
            if route.api is None:
                await route.handler(self.handlers, exchange)
                return
            exchange.deadline = _deadline(exchange)
            refused_on_arrival = True
            # gRPC's bound, messages and deadline rule, before the body is read.
            seconds_left = _seconds_left(exchange.deadline)
            with self.admission.admitted(route.api, seconds_left, name or None):
                refused_on_arrival = False
                await _within(route.handler(self.handlers, exchange), exchange.deadline)
        except TlserveError as exc:
            outcome = outcome_of(exc)
            if route.api is not None:
                refused(route.api, exc.code, str(exc))
            await exchange.error(_status(exc), exc, details(exc))
        except ClientGone:
            outcome = "CANCELLED"
        except Exception:
            outcome = "INTERNAL"
            log.exception("%s %s failed", exchange.method, scope["path"][:200])
            await exchange.error(500, TlserveError(), "internal error; see server logs")
        finally:
            if route.api is not None and not refused_on_arrival:
                record(self.core, route.api, name, outcome, started)

    def _authenticate(self, exchange: Exchange, route: _Route) -> None:
        if self._token is None or route.open:
            return
        scheme, _, credential = exchange.headers.get("authorization", "").partition(" ")
        given: bytes | None = credential.strip().encode() if scheme.lower() == "bearer" else None
        if given is None and exchange.method == "GET":
            # The page's reports and figures are plain links: the page keeps the
            # token in a cookie for them. Never for a POST (no cross-site calls).
            given = _cookie(exchange.headers.get("cookie", ""), _TOKEN_COOKIE)
        if given is not None and hmac.compare_digest(given, self._token):
            return
        why = "missing" if given is None else "invalid"
        self._on_denied(why)
        raise Unauthenticated(
            "missing credentials: send header 'Authorization: Bearer <token>'"
            if given is None
            else "invalid bearer token"
        )


_ROUTES = (
    _Route("GET", re.compile(r"/v2/health/live"), Handlers.live, open=True),
    _Route("GET", re.compile(r"/v2/health/ready"), Handlers.ready, open=True),
    _Route("GET", re.compile(r"/v2"), Handlers.server_metadata),
    _Route("GET", re.compile(_MODEL), Handlers.model_metadata),
    _Route("GET", re.compile(_MODEL + "/ready"), Handlers.model_ready),
    _Route("POST", re.compile(_MODEL + "/infer"), Handlers.infer, api=API_INFER),
    _Route("POST", re.compile(_MODEL + "/classify"), Handlers.classify, api=API_CLASSIFY),
    _Route("GET", re.compile(r"/(?:static/(?P<file>[^/]+))?"), Handlers.page_file, open=True),
    _Route("GET", re.compile(r"/ui/models"), Handlers.page_models),
    _Route(
        "GET",
        re.compile(r"/ui/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/report"),
        Handlers.page_report,
    ),
    _Route(
        "GET",
        re.compile(r"/ui/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/files/(?P<file>[^/]+)"),
        Handlers.page_figure,
    ),
)


def _match(exchange: Exchange) -> _Route | None:
    path, method = exchange.scope["path"], exchange.method
    for route in _ROUTES:
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            found = route.pattern.fullmatch(path)
            if found:
                exchange.params = {k: v for k, v in found.groupdict().items() if v is not None}
                return route
    return None


def _allowed(path: str) -> bool:
    return any(route.pattern.fullmatch(path) for route in _ROUTES)


def _status(exc: TlserveError) -> int:
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, BodyTimeout):
        return 408
    return http_status(exc)


def _deadline(exchange: Exchange) -> float | None:
    """The call's deadline on the event loop's clock, from the ``Timeout`` header."""
    raw = exchange.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"Timeout must be a number of seconds, got {raw[:40]!r}")
    return asyncio.get_running_loop().time() + seconds


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


async def _within(work: Awaitable[None], deadline: float | None) -> None:
    if deadline is None:
        await work
        return
    left = deadline - asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(work, max(0.0, left))
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed before the answer was ready") from None


def _cookie(header: str, key: str) -> bytes | None:
    for pair in header.split(";"):
        name, _, value = pair.strip().partition("=")
        if name == key and value:
            return unquote(value).encode()
    return None
