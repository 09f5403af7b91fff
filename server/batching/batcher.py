"""Dynamic batching: one queue per model version, futures for the callers.

Requests join a bounded queue (:mod:`tlserve.server.batching.queueing`: what cannot
be answered is refused at once, saying why; deadlines are kept in the queue;
under sustained overload the freshest requests go first). ``instances``
worker tasks each take what is queued, up to ``max_batch_size`` rows, run it
in a thread (onnxruntime releases the GIL, and one session may run
concurrently) and hand each caller its own rows. A batch that starts while
no other runs and none waits may go to a second session with more threads
(load-time tuning's ``lone_threads``): the lone request of a quiet moment
gets every core, not the one core per instance that throughput wants.

Filling a batch: whatever is queued is taken at once. If the queue runs dry
and the rows so far are one of the ``preferred_batch_sizes``, the batch runs
now; otherwise the worker waits up to ``max_queue_delay`` for more. A batch
never grows past the largest preferred size (when any are given). Requests
cancelled or past their deadline never take a batch slot; a failing batch
fails exactly the requests in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from tlserve.contract.errors import ServerError, Unavailable
from tlserve.server.batching.queueing import Pending, RequestQueue
from tlserve.server.batching.speed import Speed
from tlserve.server.batching.statistics import ModelStatistics
from tlserve.server.metrics import ServerMetrics

__all__ = ["DynamicBatcher"]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


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
        fresh_first: bool = True,
        standing: float | None = None,
        max_wait: float | None = None,
        run_alone: RunFn | None = None,
    ) -> None:
        self._run_batch = run
        # A batch that starts while no other runs may use every core (None: ``run``).
        self._run_alone = run_alone
        self.name = name
        # A model without a free batch dimension runs one request at a time.
        self.max_batch_size = max_batch_size if batchable else 1
        self.batchable = batchable
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.preferred = tuple(s for s in sorted(set(preferred_batch_sizes)) if s <= max_batch_size)
        self.instances = instances
        self.stats = stats if stats is not None else ModelStatistics()
        # Recent compute time per row: the basis of the retry hint and of
        # whether a deadline can be met. Written here only; the queue reads it.
        self.speed = Speed(row_seconds, instances)
        self._executor = executor
        self._metrics = metrics
        # Queue order (see tlserve.server.batching.queueing): newest first once the
        # oldest request has waited `standing` seconds (None: as measured).
        self._fresh_first, self._standing = fresh_first, standing
        self._max_wait = max_wait  # queued work, in seconds, past which requests are refused
        self._carry: dict[int, Pending] = {}  # per worker: starts its next batch
        self._queue: RequestQueue | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # Queue and tasks belong to the running loop, so they are made here.
        self._queue = RequestQueue(
            self.name, self._metrics, self.speed, max_rows=self.max_queue_size,
            batch_rows=self.max_batch_size, fresh_first=self._fresh_first,
            standing=self._standing, max_wait=self._max_wait,
        )  # fmt: skip
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
        if self._queue is not None:
            pending += self._queue.drain()
        for item in pending:
            if not item.future.done():
                item.future.set_exception(Unavailable(f"model {self.name!r} is shutting down"))
        self._carry.clear()

    @property
    def queued_rows(self) -> int:
        return self._queue.rows if self._queue is not None else 0

    @property
    def row_seconds(self) -> float:
        return self.speed.row_seconds

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait behind the work already here."""
        if self._queue is None:
            return 0.0
        return self._queue.expected_wait()

    def time_to_answer(self, rows: int = 1, deadline: float | None = None) -> float:
        """Seconds until a request of ``rows`` arriving now with ``deadline`` (on the
        loop's clock) would be answered."""
        if self._queue is None:  # not started: nothing queued
            return self.speed.seconds(rows)
        return self._queue.time_to_answer(rows, deadline)

    def retry_after(self, rows: int = 0) -> float:
        """Seconds until the queue (plus ``rows``) drains, at the recent per-row speed."""
        if self._queue is None:  # not started: nothing queued
            return self.speed.seconds(rows)
        return self._queue.retry_after(rows)

    async def submit(self, inputs: Arrays, *, deadline: float | None = None) -> Arrays:
        """Queue a request of N rows and wait for its N rows of outputs.

        A request larger than the max batch size is split into several
        queue entries and its outputs joined back in order. ``deadline`` is
        on the event loop's clock.
        """
        rows = next(iter(inputs.values())).shape[0] if self.batchable else 1
        queue = self._serving()
        queue.admit(rows, deadline)
        if rows <= self.max_batch_size:
            return await queue.wait(inputs, rows, deadline)
        step = self.max_batch_size
        parts = [{k: v[i : i + step] for k, v in inputs.items()} for i in range(0, rows, step)]
        tasks = [
            asyncio.ensure_future(queue.wait(part, len(next(iter(part.values()))), deadline))
            for part in parts
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one part failed: the others' rows need not run
            for task in tasks:
                task.cancel()
            raise
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    def _serving(self) -> RequestQueue:
        if self._queue is None or not any(not t.done() for t in self._tasks):
            raise Unavailable(f"model {self.name!r} is not serving")
        return self._queue

    async def _next_item(self, worker: int) -> Pending:
        assert self._queue is not None
        while True:
            item = self._carry.pop(worker, None)
            if item is not None:
                if self._queue.wanted(item):
                    return item
                continue
            item = await self._queue.get()
            if self._queue.take(item):
                return item

    def _full(self, rows: int) -> bool:
        return rows >= self.max_batch_size or bool(self.preferred and rows >= self.preferred[-1])

    async def _collect(self, worker: int) -> list[Pending]:
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
            if not self._queue.take(item):
                continue
            limit = self.preferred[-1] if self.preferred else self.max_batch_size
            if rows + item.rows > limit or item.signature() != first.signature():
                self._carry[worker] = item  # starts this worker's next batch
                break
            batch.append(item)
            rows += item.rows
        # Deadlines may have passed while the batch filled. Rows go in arrival
        # order, however the queue handed them out.
        batch.sort(key=lambda item: item.enqueued)
        return [item for item in batch if self._queue.wanted(item)]

    async def _worker(self, worker: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(worker)
            if batch:
                await self._execute(loop, batch)

    def _timed_run(self, run: RunFn, parts: list[Arrays]) -> tuple[Arrays, int, int]:
        """Join the requests' rows and run them (in the executor: a batch of 150 KB
        images is megabytes to copy, and the event loop has calls to accept)."""
        started = time.perf_counter_ns()
        feeds = parts[0] if len(parts) == 1 else {
            k: np.concatenate([part[k] for part in parts]) for k in parts[0]
        }  # fmt: skip
        joined = time.perf_counter_ns()
        outputs = run(feeds)
        return outputs, joined - started, time.perf_counter_ns() - joined

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Pending]) -> None:
        rows = sum(item.rows for item in batch)
        started = time.perf_counter()
        # Alone: no batch running and none waiting to start beside it.
        lone = self.speed.running_rows == 0 and self.queued_rows == 0 and not self._carry
        run = self._run_alone if lone and self._run_alone is not None else self._run_batch
        self.speed.started(rows)
        for item in batch:
            item.started = True
            self._metrics.queue_duration.labels(self.name).observe(started - item.enqueued)
            self.stats.record_queue(int((started - item.enqueued) * 1e9))
        parts = [item.inputs for item in batch]
        try:
            outputs, input_ns, infer_ns = await loop.run_in_executor(
                self._executor, self._timed_run, run, parts
            )
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
            self.speed.ended(rows)
            self._metrics.compute_duration.labels(self.name).observe(time.perf_counter() - started)
            self._metrics.batch_size.labels(self.name).observe(rows)
        self.speed.measured(rows, infer_ns / 1e9)
        if self._queue is not None:
            self._queue.publish()
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
