"""Status codes, counting, logging and deadlines for the servicers, in one place.

:func:`handled` turns domain errors into ``context.abort`` with their status
(anything unexpected is logged with its traceback and becomes INTERNAL, no
internals leaked) and puts an ``Overloaded``'s retry hint, or the deadline
a ``DeadlineExceeded`` still had when refused, in trailing metadata
(:func:`~tlserve.contract.errors.error_trailer`). :func:`counted` does the
same bookkeeping for one message of a stream, whose errors travel in the
message instead.

Every outcome is counted with its real code
(:func:`~tlserve.server.metrics.outcome_of`): a call whose deadline passed
while it waited is DEADLINE_EXCEEDED, not the CANCELLED that gRPC's task
cancellation looks like. Error details are cut to :data:`MAX_DETAILS`
characters, so an error never echoes a caller's value back in full (gRPC
sends details as a header, and a 20 KB one breaks the call). A caller's
mistake is logged as one WARNING line, at most one a second
(:func:`refused`): hostile input cannot flood the log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from tlserve.contract.errors import TlserveError, error_trailer
from tlserve.server.core.inference import InferenceCore
from tlserve.server.metrics import outcome_of, time_left

__all__ = ["MAX_DETAILS", "counted", "deadline_of", "details", "handled", "record", "refused"]

log = logging.getLogger(__name__)

#: Longest error message sent to a caller, in characters.
MAX_DETAILS = 512

# The caller's fault: worth one (rate-limited) log line, never a traceback.
_CALLER_FAULTS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _HasCore(Protocol):
    core: InferenceCore


Servicer = TypeVar("Servicer", bound=_HasCore)
Handler = Callable[[Servicer, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


class _RateLimitedWarnings:
    """At most one WARNING per ``interval`` seconds; the next one says how many were dropped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._dropped = 0
        self._lock = threading.Lock()

    def warn(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._dropped += 1
                return
            dropped, self._dropped = self._dropped, 0
            self._next = now + self.interval
        if dropped:
            message += f" (and {dropped} more refused requests not logged)"
        log.warning("%s", message)


# Process-wide on purpose: the log it protects is the process's.
_warnings = _RateLimitedWarnings(interval=1.0)


def details(exc: BaseException) -> str:
    """The error's message for the caller, cut to :data:`MAX_DETAILS` characters."""
    text = str(exc)
    if len(text) <= MAX_DETAILS:
        return text
    return f"{text[: MAX_DETAILS - 30]}... ({len(text)} characters)"


def refused(api: str, code: grpc.StatusCode, message: str) -> None:
    """Log a request refused for the caller's fault: one line, rate-limited."""
    if code in _CALLER_FAULTS:
        _warnings.warn(f"refused {api}: {code.name}: {message[:200]}")


def record(core: InferenceCore, api: str, model_name: str, outcome: str, started: float) -> None:
    model = core.metric_label(model_name)
    core.metrics.requests.labels(model, api, outcome).inc()
    core.metrics.request_duration.labels(model, api).observe(time.perf_counter() - started)


async def counted(
    core: InferenceCore,
    api: str,
    model_name: str,
    work: Awaitable[Resp],
    deadline: float | None = None,
) -> Resp:
    """Await one stream message's work, counting and timing it as a unary call would be.

    ``deadline``: the stream's, on the event loop's clock.
    """
    started, outcome = time.perf_counter(), outcome_of(None)
    try:
        return await work
    except BaseException as exc:
        outcome = outcome_of(exc, time_left(deadline))
        if isinstance(exc, TlserveError):
            refused(api, exc.code, str(exc))
        raise
    finally:
        record(core, api, model_name, outcome, started)


def handled(
    api: str | None = None,
) -> Callable[[Handler[Servicer, Req, Resp]], Handler[Servicer, Req, Resp]]:
    """Map domain errors to status codes; with ``api``, count and time the call."""

    def wrap(method: Handler[Servicer, Req, Resp]) -> Handler[Servicer, Req, Resp]:
        name = api or method.__name__

        @functools.wraps(method)
        async def handler(
            self: Servicer, request: Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Resp:
            started = time.perf_counter()
            outcome = outcome_of(None)
            try:
                return await method(self, request, context)
            except TlserveError as exc:
                outcome = outcome_of(exc)
                refused(name, exc.code, str(exc))
                await context.abort(exc.code, details(exc), trailing_metadata=error_trailer(exc))
            except asyncio.CancelledError as exc:
                outcome = outcome_of(exc, context.time_remaining())
                raise
            except Exception as exc:
                outcome = outcome_of(exc)
                log.exception("%s failed", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see server logs")
            finally:
                if api is not None:
                    record(self.core, api, getattr(request, "model_name", ""), outcome, started)
            raise AssertionError("unreachable: context.abort raises")

        return handler

    return wrap


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining
