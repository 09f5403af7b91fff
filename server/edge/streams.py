"""Bidirectional streams answered in order, with per-message errors.

Each request on a stream is started as soon as it arrives (so a stream
keeps the batcher as busy as concurrent unary calls would), and the answers
are sent in request order. At most ``window`` requests are in progress per
stream: a client that sends faster than the model answers is slowed by
gRPC's flow control, not buffered without bound. A failed request is
answered with ``"<STATUS_CODE>: <message>"`` and the stream goes on; so is
a message that is not a valid request at all (the request interceptor hands
it on as :class:`Undecodable`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tlserve.contract.errors import InvalidInput, TlserveError
from tlserve.server.edge.handling import details

__all__ = ["STREAM_WINDOW", "Undecodable", "answer_in_order", "status_message"]

log = logging.getLogger(__name__)

STREAM_WINDOW = 32

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class Undecodable:
    """A stream message that did not parse: answered with ``error``, the stream goes on.

    ``placeholder``: an empty request of the stream's type, for the answer's
    echoed fields.
    """

    error: InvalidInput
    placeholder: Any


def status_message(exc: BaseException) -> str:
    """``"<STATUS_CODE>: <message>"`` for a failed stream message; internals stay hidden."""
    if isinstance(exc, TlserveError):
        return f"{exc.code.name}: {details(exc)}"
    return "INTERNAL: internal error; see server logs"


async def _fail(error: InvalidInput) -> Any:
    raise error


async def answer_in_order(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    on_error: Callable[[Req, str], Resp],
    *,
    window: int = STREAM_WINDOW,
) -> AsyncIterator[Resp]:
    """Yield one answer per request, in order; ``on_error`` builds failed answers."""
    started: asyncio.Queue[tuple[Req, asyncio.Task[Resp]] | None] = asyncio.Queue(window)

    async def read() -> None:
        try:
            async for request in requests:
                if isinstance(request, Undecodable):
                    failed = asyncio.ensure_future(_fail(request.error))
                    await started.put((request.placeholder, failed))
                else:
                    await started.put((request, asyncio.ensure_future(handle(request))))
        finally:
            await started.put(None)

    reader = asyncio.create_task(read())
    try:
        while (entry := await started.get()) is not None:
            request, task = entry
            try:
                yield await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, TlserveError):
                    log.exception("a stream request failed")
                yield on_error(request, status_message(exc))
        await reader  # surfaces an error reading the stream itself
    finally:
        reader.cancel()
        while not started.empty():
            entry = started.get_nowait()
            if entry is not None:
                entry[1].cancel()
