"""Dynamic batching: one queue per model, futures for the callers.

Requests join a bounded queue (full -> :class:`Overloaded` at once, never an
unbounded wait). One worker task takes what is queued, up to
``max_batch_size`` rows, waiting at most ``max_queue_delay`` for more, runs
the batch in a thread (onnxruntime releases the GIL) and hands each caller
its own rows. Requests whose deadline passed or whose call was cancelled are
dropped before they take a batch slot; a failing batch fails exactly the
requests in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from tlserve.client.errors import DeadlineExceeded, Overloaded, ServerError, Unavailable
from tlserve.server.metrics import ServerMetrics

__all__ = ["DynamicBatcher"]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    deadline: float | None  # on the event loop's clock
    enqueued: float = field(default_factory=time.perf_counter)

    def signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Requests can share a batch only if all but the first dim agree."""
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.inputs.items()))


class DynamicBatcher:
    """Batches requests for one model. Call :meth:`start` inside the loop."""

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
    ) -> None:
        self._run_batch = run
        self.name = name
        # A model without a free batch dimension runs one request at a time.
        self.max_batch_size = max_batch_size if batchable else 1
        self.batchable = batchable
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self._executor = executor
        self._metrics = metrics
        self._queued_rows = 0
        self._carry: _Pending | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Queue and task belong to the running loop, so they are made here.
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker(), name=f"batcher:{self.name}")

    async def stop(self) -> None:
        """Stop the worker; anything still queued fails with Unavailable."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        pending = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(Unavailable(f"model {self.name!r} is shutting down"))
        self._carry = None
        self._queued_rows = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

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
            f"the limit of {self.max_queue_size}. Retry later."
        )

    async def _enqueue(self, inputs: Arrays, rows: int, deadline: float | None) -> Arrays:
        if self._queue is None or self._task is None or self._task.done():
            raise Unavailable(f"model {self.name!r} is not serving")
        if self._queued_rows + rows > self.max_queue_size:
            raise self._overloaded(rows)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        self._queued_rows += rows
        self._metrics.queue_depth.labels(self.name).set(self._queued_rows)
        self._queue.put_nowait(_Pending(inputs, rows, future, deadline))
        return await future

    def _admit(self, item: _Pending) -> bool:
        """Take an item off the queue; False if it no longer wants an answer."""
        self._queued_rows -= item.rows
        self._metrics.queue_depth.labels(self.name).set(self._queued_rows)
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

    async def _next_item(self) -> _Pending:
        assert self._queue is not None
        while True:
            if self._carry is not None:
                item, self._carry = self._carry, None
                if self._still_wanted(item):
                    return item
                continue
            item = await self._queue.get()
            if self._admit(item):
                return item

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        first = await self._next_item()
        batch, rows = [first], first.rows
        loop = asyncio.get_running_loop()
        fill_until = loop.time() + self.max_queue_delay
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = fill_until - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    break
            if not self._admit(item):
                continue
            if rows + item.rows > self.max_batch_size or item.signature() != first.signature():
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            await self._execute(loop, batch)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        rows = sum(item.rows for item in batch)
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_duration.labels(self.name).observe(started - item.enqueued)
        if len(batch) == 1:
            feeds = batch[0].inputs
        else:
            feeds = {k: np.concatenate([item.inputs[k] for item in batch]) for k in batch[0].inputs}
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, feeds)
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
