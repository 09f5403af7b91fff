"""Status codes, counting and deadlines for the servicers, in one place.

:func:`handled` turns domain errors into ``context.abort`` with their status
(anything unexpected is logged and becomes INTERNAL, no internals leaked) and
puts an ``Overloaded``'s retry hint in trailing metadata
(:func:`~tlserve.contract.errors.retry_trailer`). :func:`counted` does the same bookkeeping for one
message of a stream, whose errors travel in the message instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from tlserve.contract.errors import TlserveError, retry_trailer
from tlserve.server.core import InferenceCore

__all__ = ["counted", "deadline_of", "handled", "record"]

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _HasCore(Protocol):
    core: InferenceCore


Servicer = TypeVar("Servicer", bound=_HasCore)
Handler = Callable[[Servicer, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def record(core: InferenceCore, api: str, model_name: str, outcome: str, started: float) -> None:
    model = core.metric_label(model_name)
    core.metrics.requests.labels(model, api, outcome).inc()
    core.metrics.request_duration.labels(model, api).observe(time.perf_counter() - started)


async def counted(core: InferenceCore, api: str, model_name: str, work: Awaitable[Resp]) -> Resp:
    """Await one stream message's work, counting and timing it as a unary call would be."""
    started, outcome = time.perf_counter(), "OK"
    try:
        return await work
    except TlserveError as exc:
        outcome = exc.code.name
        raise
    except BaseException:
        outcome = "INTERNAL"
        raise
    finally:
        record(core, api, model_name, outcome, started)


def handled(
    api: str | None = None,
) -> Callable[[Handler[Servicer, Req, Resp]], Handler[Servicer, Req, Resp]]:
    """Map domain errors to status codes; with ``api``, count and time the call."""

    def wrap(method: Handler[Servicer, Req, Resp]) -> Handler[Servicer, Req, Resp]:
        @functools.wraps(method)
        async def handler(
            self: Servicer, request: Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Resp:
            started = time.perf_counter()
            outcome = "OK"
            try:
                return await method(self, request, context)
            except TlserveError as exc:
                outcome = exc.code.name
                await context.abort(exc.code, str(exc), trailing_metadata=retry_trailer(exc))
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            except Exception:
                outcome = "INTERNAL"
                log.exception("%s failed", api or method.__name__)
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
