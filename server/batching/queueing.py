"""The batcher's queue: bounded in rows, deadline-aware, freshest first under overload.

Admission (:meth:`RequestQueue.admit`) says why it refuses:

- more rows than the whole queue holds: ``InvalidInput`` (it could never run);
- the queue is full: ``Overloaded``, with the time it needs to drain as the
  retry hint;
- the work ahead of it would keep it queued past ``max_wait`` seconds
  (queued work measured in time, so a slow model queues fewer rows than a
  fast one): ``Overloaded`` (reason ``queue_time``), with the time the
  queue needs to drain as the hint;
- the work ahead of it, at the measured per-row compute time, would keep it
  past its deadline: ``DeadlineExceeded`` at once, before it takes room
  (while the queue stands, the work ahead is every queued request with more
  time left, served first: a short deadline waits behind them).

A queued request whose deadline comes before it could run is failed by a
timer with ``DeadlineExceeded`` (the caller hears DEADLINE_EXCEEDED, not a
cancellation, and it never takes a batch slot); a cancelled one frees its
room at once.

Order: a queue that stays long means arrivals outpace the model. Served
oldest first, every request then waits the whole queue and those served are
the ones nearest their deadlines; served freshest first ("adaptive LIFO", as
in Facebook's Wangle, with CoDel's idea of a *standing* queue), requests
whose callers still wait are answered in time, and stale ones reach their
deadlines in the queue and leave without running. So the queue is served in
arrival order until its oldest request has waited longer than ``standing``
seconds, and while that lasts the request with the most time left before
its deadline goes first (the newest among equals; no deadline counts as the
most time): a call that waited on the caller's side of the connection is
not fresh for having just arrived.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tlserve.contract.errors import DeadlineExceeded, InvalidInput, Overloaded
from tlserve.server.batching.speed import Speed
from tlserve.server.metrics import ServerMetrics

__all__ = ["Pending", "RequestQueue"]

Arrays = dict[str, np.ndarray]

# Bounds of the retry hint, in seconds.
_MIN_RETRY_S, _MAX_RETRY_S = 0.001, 30.0
# A queued request is failed at least this long before its deadline: gRPC
# cancels the call at the deadline itself, and the caller should hear
# DEADLINE_EXCEEDED from the queue first.
_MIN_LEAD_S = 0.002


@dataclass(eq=False)  # compared by identity: its inputs are arrays
class Pending:
    """One queued request (or one part of a split one) and its caller's future."""

    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    deadline: float | None  # on the event loop's clock
    enqueued: float = field(default_factory=time.perf_counter)
    dequeued: bool = False  # its rows no longer count as queued
    started: bool = False  # its batch is running: it will be answered

    def signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Requests can share a batch only if all but the first dim agree."""
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.inputs.items()))


def _time_left(item: Pending) -> tuple[float, float]:
    """Sort key: its deadline (none: patient, first), then how recently it came."""
    return (math.inf if item.deadline is None else item.deadline, item.enqueued)


class RequestQueue:
    """Pending requests of one model version. Make it inside the running loop."""

    def __init__(
        self,
        name: str,
        metrics: ServerMetrics,
        speed: Speed,
        *,
        max_rows: int,
        batch_rows: int,
        fresh_first: bool = True,
        standing: float | None = None,
        max_wait: float | None = None,
    ) -> None:
        self.name = name
        self.max_wait = max_wait  # None: bounded in rows only
        self.speed = speed  # read here, written only by the batcher
        self.max_rows = max_rows
        self.fresh_first = fresh_first
        # None: a few full batches' compute, as measured (at least 50 ms).
        self._standing = standing
        self._batch_rows = batch_rows
        self._metrics = metrics
        self._items: deque[Pending] = deque()
        self._ready = asyncio.Event()
        self.rows = 0  # queued rows, cancelled and expired ones not counted

    @property
    def standing(self) -> float:
        """Seconds the oldest request may wait before the queue counts as overloaded."""
        if self._standing is not None:
            return self._standing
        return max(0.05, 4 * self.speed.seconds(self._batch_rows))

    def retry_after(self, rows: int = 0) -> float:
        """Seconds until the queue (plus ``rows``) drains, at the recent per-row speed."""
        return min(_MAX_RETRY_S, max(_MIN_RETRY_S, self.speed.seconds(self.rows + rows)))

    def expected_wait(self, rows: int = 0) -> float:
        """Seconds the queue's work and the running batches take, plus ``rows``."""
        return self.speed.seconds(self.speed.running_rows + self.rows + rows)

    def time_to_answer(self, rows: int, deadline: float | None = None) -> float:
        """Seconds until a request of ``rows`` arriving now, with ``deadline`` (on
        the loop's clock; None: none), is answered, at the measured speed.

        The one rule for "too late to answer": the queue's admission and the
        server's admission before the message is read both use it.
        """
        ahead = self.speed.running_rows
        if not self.fresh_first_now():
            ahead += self.rows
        elif deadline is not None:
            # Served by time left, every queued request with more of it goes first:
            # a call with a short deadline is served after them, not at once.
            ahead += sum(
                item.rows
                for item in self._items
                if not item.dequeued and (item.deadline is None or item.deadline > deadline)
            )
        return self.speed.seconds(ahead + rows)

    def publish(self) -> None:
        """Set the estimated-queue-time gauge (the signal an autoscaler wants)."""
        self._metrics.queue_time.labels(self.name).set(self.expected_wait())

    def admit(self, rows: int, deadline: float | None) -> None:
        """Refuse at once what cannot be answered, saying why."""
        if rows > self.max_rows:
            self._shed("too_large")
            raise InvalidInput(
                f"{rows} rows can never fit: model {self.name!r} queues at most "
                f"{self.max_rows} rows; send at most {self.max_rows} per request"
            )
        if self.rows + rows > self.max_rows:
            self._shed("queue_full")
            raise Overloaded(
                f"model {self.name!r} has {self.rows} rows queued; {rows} more would pass "
                f"the limit of {self.max_rows}. Retry later.",
                retry_after=self.retry_after(rows),
            )
        self._within_max_wait(rows)
        if deadline is None:
            return
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            self._shed("late")
            raise DeadlineExceeded(
                f"the deadline passed before reaching model {self.name!r}", seconds_left=0.0
            )
        wait = self.time_to_answer(rows, deadline)
        if wait > remaining:
            self._shed("late")
            raise DeadlineExceeded(
                f"model {self.name!r} cannot answer in time: about {wait * 1e3:.0f} ms of work "
                f"is ahead of these {rows} rows and the deadline is in {remaining * 1e3:.0f} ms",
                seconds_left=remaining,
            )

    def _within_max_wait(self, rows: int) -> None:
        # A batch's worth always fits, or the model could never fill one.
        if self.max_wait is None or self.rows + rows <= self._batch_rows:
            return
        wait = self.expected_wait(rows)
        if wait > self.max_wait:
            self._shed("queue_time")
            raise Overloaded(
                f"model {self.name!r} has about {wait * 1e3:.0f} ms of work queued, past its "
                f"limit of {self.max_wait * 1e3:.0f} ms. Retry later.",
                # The whole drain, not the excess: a hint of a few ms brought every
                # refused caller straight back, each costing a parse (lite0, bench-overload).
                retry_after=self.retry_after(rows),
            )

    async def wait(self, inputs: Arrays, rows: int, deadline: float | None) -> Arrays:
        """Queue ``inputs`` (already admitted) and wait for their outputs."""
        loop = asyncio.get_running_loop()
        item = Pending(inputs, rows, loop.create_future(), deadline)
        self._count(rows)
        self._items.append(item)
        if len(self._items) > 2 * self.max_rows:  # cancelled/expired ones left in the middle
            self._items = deque(i for i in self._items if not i.future.done())
        self._ready.set()
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline - self._lead(item), self._expire, item)
        try:
            return await item.future
        except asyncio.CancelledError:
            if not item.dequeued:  # free its room now; the worker will skip it
                item.dequeued = True
                self._count(-rows)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def fresh_first_now(self) -> bool:
        """True when the next request served is the newest one."""
        return self.fresh_first and self._overloaded()

    def get_nowait(self) -> Pending:
        """The next request to serve (maybe no longer wanted: see :meth:`take`)."""
        if self.fresh_first_now():
            # The one with the most time left, newest among equals: a call that
            # waited on the caller's side is not fresh for having just arrived.
            # The inference bound keeps this scan short.
            live = [item for item in self._items if not item.future.done()]
            if live:
                chosen = max(live, key=_time_left)
                self._items.remove(chosen)
                return chosen
            self._items.clear()
        if not self._items:
            self._ready.clear()
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Pending:
        while True:
            try:
                return self.get_nowait()
            except asyncio.QueueEmpty:
                await self._ready.wait()

    def take(self, item: Pending) -> bool:
        """Mark ``item`` as out of the queue; False if it no longer wants an answer."""
        if not item.dequeued:
            item.dequeued = True
            self._count(-item.rows)
        return self.wanted(item)

    def wanted(self, item: Pending) -> bool:
        """False (and the caller told why) once cancelled or too late to answer."""
        if item.future.done():  # cancelled, or expired by its timer
            return False
        late = item.deadline is not None and (
            asyncio.get_running_loop().time() >= item.deadline - self._lead(item)
        )
        if late:
            self._expire(item)
        return not late

    def drain(self) -> list[Pending]:
        """Everything still queued, removed."""
        items = list(self._items)
        self._items.clear()
        self._count(-self.rows)
        return items

    def _overloaded(self) -> bool:
        while self._items and self._items[0].future.done():
            self._items.popleft()  # already answered: cancelled or expired
        return bool(self._items) and time.perf_counter() - self._items[0].enqueued > self.standing

    def _lead(self, item: Pending) -> float:
        """How long before its deadline a queued item can no longer be answered."""
        return max(_MIN_LEAD_S, item.rows * self.speed.row_seconds)

    def _expire(self, item: Pending) -> None:
        if item.started or item.future.done():
            return
        if not item.dequeued:
            item.dequeued = True
            self._count(-item.rows)
        self._shed("expired")
        item.future.set_exception(
            DeadlineExceeded(f"deadline passed while queued for model {self.name!r}")
        )

    def _count(self, rows: int) -> None:
        self.rows += rows
        self._metrics.queue_depth.labels(self.name).inc(rows)
        self.publish()

    def _shed(self, reason: str) -> None:
        self._metrics.shed.labels(self.name, reason).inc()
