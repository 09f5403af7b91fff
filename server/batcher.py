"""Dynamic batching: one queue per model version, futures for the callers.

Requests join a bounded queue (full -> :class:`~tlserve.contract.errors.Overloaded`
with a retry hint, at once; never an unbounded wait). ``instances`` worker
tasks each take what is queued, up to ``max_batch_size`` rows, run it in a
thread (onnxruntime releases the GIL, and one session may run concurrently)
and hand each caller its own rows.

Filling a batch: whatever is queued is taken at once. If the queue runs dry
and the rows so far are one of the ``preferred_batch_sizes``, the batch runs
now; otherwise the worker waits up to ``max_queue_delay`` for more. A batch
never grows past the largest preferred size (when any are given).

Requests whose deadline passed or whose call was cancelled are dropped
before they take a batch slot (and a cancelled request frees its queue
room at once); a failing batch fails exactly the requests in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from tlserve.contract.errors import DeadlineExceeded, Overloaded, ServerError, Unavailable
from tlserve.server.metrics import ServerMetrics
from tlserve.server.statistics import ModelStatistics

__all__ = ["DynamicBatcher"]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]

# Bounds of the retry hint, in seconds.
_MIN_RETRY_S, _MAX_RETRY_S = 0.001, 30.0
_EWMA = 0.2  # weight of the newest batch in the per-row compute estimate


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    deadline: float | None  # on the event loop's clock
    enqueued: float = field(default_factory=time.perf_counter)
    dequeued: bool = False

    def signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Requests can share a batch only if all but the first dim agree."""
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.inputs.items()))


class DynamicBatcher:
    """Batches requests for one model version. Call :meth:`start` inside the loop."""

    def __init__(
        self,
        run: RunFn,
        *,
        name: str,
        batchable: bool,
        executor: Executor,
        metrics: ServerMetrics,
        max_batch_size: int = 32,
        max_queue_delay: float = 0.0,
        max_queue_size: int = 256,
        preferred_batch_sizes: Sequence[int] = (),
        instances: int = 1,
        stats: ModelStatistics | None = None,
        row_seconds: float = 0.001,
    ) -> None:
        self._run_batch = run
        self.name = name
        # A model without a free batch dimension runs one request at a time.
        self.max_batch_size = max_batch_size if batchable else 1
        self.batchable = batchable
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.preferred = tuple(s for s in sorted(set(preferred_batch_sizes)) if s <= max_batch_size)
        self.instances = instances
        self.stats = stats if stats is not None else ModelStatistics()
        # Recent compute seconds per row (EWMA): the basis of the retry hint.
        self.row_seconds = row_seconds
        self._executor = executor
        self._metrics = metrics
        self._queued_rows = 0
        self._carry: dict[int, _Pending] = {}  # per worker: starts its next batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # Queue and tasks belong to the running loop, so they are made here.
        self._queue = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._worker(i), name=f"batcher:{self.name}:{i}")
            for i in range(self.instances)
        ]

    async def stop(self) -> None:
        """Stop the workers; anything still queued fails with Unavailable."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        pending = list(self._carry.values())
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(Unavailable(f"model {self.name!r} is shutting down"))
        self._carry.clear()
        self._metrics.queue_depth.labels(self.name).dec(self._queued_rows)
        self._queued_rows = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def retry_after(self, rows: int = 0) -> float:
        """Seconds until the queue (plus ``rows``) drains, at the recent per-row speed."""
        seconds = (self._queued_rows + rows) * self.row_seconds / self.instances
        return min(_MAX_RETRY_S, max(_MIN_RETRY_S, seconds))

    async def submit(self, inputs: Arrays, *, deadline: float | None = None) -> Arrays:
        """Queue a request of N rows and wait for its N rows of outputs.

        A request larger than the max batch size is split into several
        queue entries and its outputs joined back in order.
        """
        rows = next(iter(inputs.values())).shape[0] if self.batchable else 1
        if rows <= self.max_batch_size:
            return await self._enqueue(inputs, rows, deadline)
        step = self.max_batch_size
        parts = [{k: v[i : i + step] for k, v in inputs.items()} for i in range(0, rows, step)]
        if self._queued_rows + rows > self.max_queue_size:
            raise self._overloaded(rows)
        results = await asyncio.gather(
            *(self._enqueue(part, len(next(iter(part.values()))), deadline) for part in parts)
        )
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    def _overloaded(self, rows: int) -> Overloaded:
        return Overloaded(
            f"model {self.name!r} has {self._queued_rows} rows queued; {rows} more would pass "
            f"the limit of {self.max_queue_size}. Retry later.",
            retry_after=self.retry_after(rows),
        )

    def _running(self) -> bool:
        return self._queue is not None and any(not t.done() for t in self._tasks)

    async def _enqueue(self, inputs: Arrays, rows: int, deadline: float | None) -> Arrays:
        if self._queue is None or not self._running():
            raise Unavailable(f"model {self.name!r} is not serving")
        if self._queued_rows + rows > self.max_queue_size:
            raise self._overloaded(rows)
        item = _Pending(inputs, rows, asyncio.get_running_loop().create_future(), deadline)
        self._count(rows)
        self._queue.put_nowait(item)
        try:
            return await item.future
        except asyncio.CancelledError:
            if not item.dequeued:  # free its room now; the worker will skip it
                item.dequeued = True
                self._count(-rows)
            raise

    def _count(self, rows: int) -> None:
        self._queued_rows += rows
        self._metrics.queue_depth.labels(self.name).inc(rows)

    def _admit(self, item: _Pending) -> bool:
        """Take an item off the queue; False if it no longer wants an answer."""
        if not item.dequeued:
            item.dequeued = True
            self._count(-item.rows)
        return self._still_wanted(item)

    def _still_wanted(self, item: _Pending) -> bool:
        """False (and the caller told why) once cancelled or past its deadline."""
        if item.future.done():  # the call was cancelled
            return False
        if item.deadline is not None and asyncio.get_running_loop().time() >= item.deadline:
            item.future.set_exception(
                DeadlineExceeded(f"deadline passed while queued for model {self.name!r}")
            )
            return False
        return True

    async def _next_item(self, worker: int) -> _Pending:
        assert self._queue is not None
        while True:
            item = self._carry.pop(worker, None)
            if item is not None:
                if self._still_wanted(item):
                    return item
                continue
            item = await self._queue.get()
            if self._admit(item):
                return item

    def _full(self, rows: int) -> bool:
        return rows >= self.max_batch_size or bool(self.preferred and rows >= self.preferred[-1])

    async def _collect(self, worker: int) -> list[_Pending]:
        assert self._queue is not None
        first = await self._next_item(worker)
        batch, rows = [first], first.rows
        loop = asyncio.get_running_loop()
        fill_until = loop.time() + self.max_queue_delay
        while not self._full(rows):
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = fill_until - loop.time()
                if remaining <= 0 or rows in self.preferred:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    break
            if not self._admit(item):
                continue
            limit = self.preferred[-1] if self.preferred else self.max_batch_size
            if rows + item.rows > limit or item.signature() != first.signature():
                self._carry[worker] = item  # starts this worker's next batch
                break
            batch.append(item)
            rows += item.rows
        # Deadlines may have passed while the batch filled.
        return [item for item in batch if self._still_wanted(item)]

    async def _worker(self, worker: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(worker)
            if batch:
                await self._execute(loop, batch)

    def _timed_run(self, feeds: Arrays) -> tuple[Arrays, int]:
        started = time.perf_counter_ns()
        outputs = self._run_batch(feeds)
        return outputs, time.perf_counter_ns() - started

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        rows = sum(item.rows for item in batch)
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_duration.labels(self.name).observe(started - item.enqueued)
            self.stats.record_queue(int((started - item.enqueued) * 1e9))
        if len(batch) == 1:
            feeds = batch[0].inputs
        else:
            feeds = {k: np.concatenate([item.inputs[k] for item in batch]) for k in batch[0].inputs}
        input_ns = int((time.perf_counter() - started) * 1e9)
        try:
            outputs, infer_ns = await loop.run_in_executor(self._executor, self._timed_run, feeds)
        except asyncio.CancelledError:  # stop() during a batch
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Unavailable(f"model {self.name!r} stopped"))
            raise
        except Exception as exc:
            log.exception("model %r failed on a batch of %d rows", self.name, rows)
            error = ServerError(f"model {self.name!r} failed on a batch of {rows} rows: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        finally:
            self._metrics.compute_duration.labels(self.name).observe(time.perf_counter() - started)
            self._metrics.batch_size.labels(self.name).observe(rows)
        self.row_seconds += _EWMA * (infer_ns / 1e9 / rows - self.row_seconds)
        output_started = time.perf_counter_ns()
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(
                    {
                        k: v[offset : offset + item.rows] if v.ndim and v.shape[0] == rows else v
                        for k, v in outputs.items()
                    }
                )
            offset += item.rows
        output_ns = time.perf_counter_ns() - output_started
        self.stats.record_batch(rows, len(batch), input_ns, infer_ns, output_ns)
