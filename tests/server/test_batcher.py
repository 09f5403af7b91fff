"""DynamicBatcher with a python "model": batching, splitting, deadlines, failures.

The model can be held at a gate (a semaphore the test releases), so "while
the worker is busy" is a state the test sets up, never a race it hopes for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tlserve.contract.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServerError,
    Unavailable,
)
from tlserve.server.batching.batcher import DynamicBatcher
from tlserve.server.metrics import ServerMetrics

Arrays = dict[str, np.ndarray]
MARKER = -1  # a batch containing this value fails


class Model:
    """Doubles its input, records every batch it is given, can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self._permits = threading.Semaphore(0)
        self._gated = False
        self.report_batch_rows = False  # an extra output without a batch dimension

    def hold(self) -> None:
        """From now on each batch waits for a :meth:`release`."""
        self._gated = True

    def release(self, batches: int = 1) -> None:
        self._permits.release(batches)

    def open(self) -> None:
        self._gated = False
        self._permits.release(1000)

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def seen(self, ident: int) -> bool:
        return any((batch == ident).any() for batch in self.batches)

    def __call__(self, feeds: Arrays) -> Arrays:
        x = feeds["x"]
        self.batches.append(x.copy())
        if self._gated:
            assert self._permits.acquire(timeout=10), "test never released the batch"
        if (x == MARKER).any():
            raise RuntimeError("bad row in batch")
        outputs = {"y": x * 2}
        if self.report_batch_rows:
            outputs["batch_rows"] = np.array(len(x))
        return outputs


class Rig:
    def __init__(self) -> None:
        self.model = Model()
        self.executor = ThreadPoolExecutor(1)
        self.metrics = ServerMetrics(CollectorRegistry())
        self.batcher: DynamicBatcher | None = None

    async def start(self, *, batchable: bool = True, **settings: float) -> DynamicBatcher:
        self.batcher = DynamicBatcher(
            self.model,
            name="m",
            batchable=batchable,
            executor=self.executor,
            metrics=self.metrics,
            **settings,  # type: ignore[arg-type]
        )
        await self.batcher.start()
        return self.batcher

    async def close(self) -> None:
        self.model.open()
        if self.batcher is not None:
            await self.batcher.stop()
        self.executor.shutdown(wait=True)

    def metric(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"model": "m"})

    def shed(self, reason: str) -> float:
        labels = {"model": "m", "reason": reason}
        value = self.metrics.registry.get_sample_value("tlserve_shed_requests_total", labels)
        return value or 0.0


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    yield rig
    await rig.close()


def request(ident: int, rows: int = 1, width: int = 2) -> Arrays:
    return {"x": np.full((rows, width), ident, dtype=np.int64)}


def assert_own_rows(result: Arrays, ident: int, rows: int = 1, width: int = 2) -> None:
    np.testing.assert_array_equal(result["y"], np.full((rows, width), 2 * ident))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def busy_with_first_request(rig: Rig, batcher: DynamicBatcher) -> asyncio.Task[Arrays]:
    """Hold the model inside a first one-row batch (ident 0) and return its task."""
    rig.model.hold()
    first = asyncio.create_task(batcher.submit(request(0)))
    await wait_until(lambda: len(rig.model.batches) == 1)
    return first


async def test_requests_queued_while_busy_run_as_one_batch(rig: Rig) -> None:
    rig.model.report_batch_rows = True
    batcher = await rig.start(max_batch_size=8)
    first = await busy_with_first_request(rig, batcher)
    rows = {1: 1, 2: 2, 3: 1, 4: 1, 5: 2}
    tasks = {i: asyncio.create_task(batcher.submit(request(i, n))) for i, n in rows.items()}
    await wait_until(lambda: batcher.queued_rows == 7)
    rig.model.open()

    assert_own_rows(await first, 0)
    for ident, task in tasks.items():
        assert_own_rows(await task, ident, rows[ident])
    assert rig.model.sizes == [1, 7]
    # In arrival order, each request's rows together.
    assert rig.model.batches[1][:, 0].tolist() == [1, 2, 2, 3, 4, 5, 5]
    # Outputs without a batch dimension go to every caller whole.
    assert int((await tasks[3])["batch_rows"]) == 7
    assert rig.metric("tlserve_batch_size_count") == 2
    assert rig.metric("tlserve_batch_size_sum") == 8
    assert rig.metric("tlserve_queue_depth") == 0


async def test_a_batch_never_passes_max_batch_size(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=4)
    first = await busy_with_first_request(rig, batcher)
    tasks = [asyncio.create_task(batcher.submit(request(i))) for i in range(1, 7)]
    await wait_until(lambda: batcher.queued_rows == 6)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in enumerate(tasks, start=1):
        assert_own_rows(await task, ident)
    assert rig.model.sizes == [1, 4, 2]


async def test_a_request_larger_than_a_batch_is_split_and_rejoined_in_order(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=4)
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    result = await batcher.submit({"x": x})
    np.testing.assert_array_equal(result["y"], x * 2)
    assert sum(rig.model.sizes) == 10
    assert max(rig.model.sizes) <= 4
    np.testing.assert_array_equal(np.concatenate(rig.model.batches), x)


async def test_queue_delay_lets_a_batch_fill(rig: Rig) -> None:
    # A delay far longer than the test: the batch is cut by size, not time.
    batcher = await rig.start(max_batch_size=4, max_queue_delay=30.0)
    tasks = []
    for ident in range(4):
        tasks.append(asyncio.create_task(batcher.submit(request(ident))))
        await asyncio.sleep(0.02)  # arrivals spread out, not all queued at once
    for ident, task in enumerate(tasks):
        assert_own_rows(await asyncio.wait_for(task, 10), ident)
    assert rig.model.sizes == [4]


async def test_a_batch_that_does_not_fill_runs_when_the_delay_ends(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=4, max_queue_delay=0.05)
    assert_own_rows(await asyncio.wait_for(batcher.submit(request(3)), 10), 3)
    assert_own_rows(await asyncio.wait_for(batcher.submit(request(4)), 10), 4)
    assert rig.model.sizes == [1, 1]


async def test_a_full_queue_is_overloaded_at_once(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=2, max_queue_size=3)
    first = await busy_with_first_request(rig, batcher)
    queued = [asyncio.create_task(batcher.submit(request(i))) for i in (1, 2, 3)]
    await wait_until(lambda: batcher.queued_rows == 3)

    # The model is held: waiting for it would hit the wait_for timeout instead.
    with pytest.raises(Overloaded, match=r"3 rows queued; 1 more .*limit of 3\. Retry later"):
        await asyncio.wait_for(batcher.submit(request(4)), 5)
    with pytest.raises(Overloaded, match="Retry later"):  # split into parts, refused whole
        await asyncio.wait_for(batcher.submit(request(5, rows=3)), 5)

    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in enumerate(queued, start=1):
        assert_own_rows(await task, ident)
    assert not rig.model.seen(4) and not rig.model.seen(5)
    assert_own_rows(await batcher.submit(request(6)), 6)  # room again


async def test_a_request_whose_deadline_passes_in_the_queue_fails_there_and_never_runs(
    rig: Rig,
) -> None:
    batcher = await rig.start(max_batch_size=8)
    first = await busy_with_first_request(rig, batcher)
    loop = asyncio.get_running_loop()
    late = asyncio.create_task(batcher.submit(request(7), deadline=loop.time() + 0.3))
    on_time = asyncio.create_task(batcher.submit(request(9), deadline=loop.time() + 60))
    # The model is still held: the queue itself answers at the deadline, as
    # DeadlineExceeded (not a cancellation), and frees the room.
    with pytest.raises(DeadlineExceeded, match="deadline passed while queued for model 'm'"):
        await asyncio.wait_for(late, 10)
    assert batcher.queued_rows == 1  # on_time is still queued
    with pytest.raises(DeadlineExceeded, match="deadline passed before reaching model 'm'"):
        await batcher.submit(request(8), deadline=loop.time() - 1)
    rig.model.open()

    assert_own_rows(await first, 0)
    assert_own_rows(await on_time, 9)
    assert not rig.model.seen(7) and not rig.model.seen(8)
    assert rig.model.sizes == [1, 1]
    assert rig.shed("expired") == 1 and rig.shed("late") == 1


async def test_a_request_the_queue_cannot_answer_in_time_is_refused_without_running(
    rig: Rig,
) -> None:
    # 100 ms of compute per row (as measured): 4 queued rows are 0.5 s of work.
    batcher = await rig.start(max_batch_size=1, row_seconds=0.1)
    first = await busy_with_first_request(rig, batcher)
    queued = [asyncio.create_task(batcher.submit(request(i))) for i in range(1, 5)]
    await wait_until(lambda: batcher.queued_rows == 4)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match=r"cannot answer in time: about 600 ms of work") as e:
        await batcher.submit(request(5), deadline=loop.time() + 0.3)
    assert e.value.seconds_left is not None and 0.2 < e.value.seconds_left <= 0.3
    assert batcher.queued_rows == 4  # refused before it took room
    roomy = asyncio.create_task(batcher.submit(request(6), deadline=loop.time() + 60))
    await wait_until(lambda: batcher.queued_rows == 5)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in enumerate(queued, start=1):
        assert_own_rows(await task, ident)
    assert_own_rows(await roomy, 6)
    assert not rig.model.seen(5)
    assert rig.shed("late") == 1


async def test_a_request_that_can_never_fit_the_queue_is_invalid_not_overloaded(
    rig: Rig,
) -> None:
    batcher = await rig.start(max_batch_size=4, max_queue_size=8)
    with pytest.raises(InvalidInput, match=r"9 rows can never fit: model 'm' queues at most 8"):
        await batcher.submit(request(1, rows=9))
    assert_own_rows(await batcher.submit(request(2, rows=8)), 2, rows=8)  # split, fits
    assert not rig.model.seen(1)
    assert rig.shed("too_large") == 1


async def test_under_sustained_overload_the_freshest_requests_run_first(rig: Rig) -> None:
    # standing=0: any wait counts as a queue that does not drain.
    batcher = await rig.start(max_batch_size=2, standing=0.0)
    first = await busy_with_first_request(rig, batcher)
    queued = {i: asyncio.create_task(batcher.submit(request(i))) for i in range(1, 6)}
    await wait_until(lambda: batcher.queued_rows == 5)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in queued.items():
        assert_own_rows(await task, ident)
    # Newest first, two at a time; rows within a batch in arrival order.
    assert [b[:, 0].tolist() for b in rig.model.batches[1:]] == [[4, 5], [2, 3], [1]]


async def test_under_sustained_overload_the_most_time_left_runs_first(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=1, standing=0.0)
    first = await busy_with_first_request(rig, batcher)
    loop = asyncio.get_running_loop()
    # Arrival order 1, 2, 3; time left 60 s, 10 s, 30 s.
    queued = {
        ident: asyncio.create_task(batcher.submit(request(ident), deadline=loop.time() + left))
        for ident, left in ((1, 60), (2, 10), (3, 30))
    }
    await wait_until(lambda: batcher.queued_rows == 3)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in queued.items():
        assert_own_rows(await task, ident)
    assert [int(b[0, 0]) for b in rig.model.batches[1:]] == [1, 3, 2]


async def test_served_by_time_left_a_short_deadline_waits_behind_every_longer_one(
    rig: Rig,
) -> None:
    # 100 ms a row; the queue stands, so it is served by time left: a request
    # due in 0.3 s waits behind the 4 queued rows due in 60 s (0.5 s with the
    # running one) and is refused at once; one due in 120 s goes first and fits.
    batcher = await rig.start(max_batch_size=1, row_seconds=0.1, standing=0.0)
    first = await busy_with_first_request(rig, batcher)
    loop = asyncio.get_running_loop()
    queued = [
        asyncio.create_task(batcher.submit(request(i), deadline=loop.time() + 60))
        for i in range(1, 5)
    ]
    await wait_until(lambda: batcher.queued_rows == 4)
    assert batcher.time_to_answer(1, loop.time() + 120) == pytest.approx(0.2, abs=0.01)
    with pytest.raises(DeadlineExceeded, match=r"about 600 ms of work") as refused:
        await batcher.submit(request(5), deadline=loop.time() + 0.3)
    assert refused.value.seconds_left is not None
    assert batcher.queued_rows == 4  # refused before it took room
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in enumerate(queued, start=1):
        assert_own_rows(await task, ident)
    assert not rig.model.seen(5)


async def test_in_arrival_order_while_the_queue_drains(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=2, fresh_first=False)
    first = await busy_with_first_request(rig, batcher)
    queued = {i: asyncio.create_task(batcher.submit(request(i))) for i in range(1, 6)}
    await wait_until(lambda: batcher.queued_rows == 5)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in queued.items():
        assert_own_rows(await task, ident)
    assert [b[:, 0].tolist() for b in rig.model.batches[1:]] == [[1, 2], [3, 4], [5]]


async def test_a_carried_over_request_whose_deadline_passed_never_runs(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=2)
    first = await busy_with_first_request(rig, batcher)
    loop = asyncio.get_running_loop()
    fits = asyncio.create_task(batcher.submit(request(1)))
    # 1 + 2 rows > 2: taken off the queue with `fits`, then carried to the next batch.
    carried = asyncio.create_task(batcher.submit(request(2, rows=2), deadline=loop.time() + 0.5))
    await wait_until(lambda: batcher.queued_rows == 3)
    rig.model.release()  # the first batch ends; `fits` runs, held
    await wait_until(lambda: len(rig.model.batches) == 2)
    assert batcher.queued_rows == 0  # `carried` is out of the queue, waiting
    await asyncio.wait([carried], timeout=10)  # its deadline passes while `fits` runs
    rig.model.open()

    assert_own_rows(await first, 0)
    assert_own_rows(await fits, 1)
    [outcome] = await asyncio.gather(carried, return_exceptions=True)
    assert isinstance(outcome, DeadlineExceeded)
    assert not rig.model.seen(2)


async def test_a_cancelled_callers_rows_never_run(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=2)
    first = await busy_with_first_request(rig, batcher)
    cancelled = asyncio.create_task(batcher.submit(request(5)))
    cancelled_split = asyncio.create_task(batcher.submit(request(6, rows=5)))
    kept = asyncio.create_task(batcher.submit(request(7)))
    await wait_until(lambda: batcher.queued_rows == 7)
    cancelled.cancel()
    cancelled_split.cancel()
    rig.model.open()

    assert_own_rows(await first, 0)
    for task in (cancelled, cancelled_split):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert_own_rows(await kept, 7)
    assert not rig.model.seen(5) and not rig.model.seen(6)
    assert rig.model.sizes == [1, 1]


async def test_a_failing_batch_fails_exactly_its_requests(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=8)
    first = await busy_with_first_request(rig, batcher)
    poisoned = asyncio.create_task(batcher.submit(request(MARKER)))
    neighbour = asyncio.create_task(batcher.submit(request(3)))
    await wait_until(lambda: batcher.queued_rows == 2)
    rig.model.open()

    assert_own_rows(await first, 0)
    for task in (poisoned, neighbour):
        with pytest.raises(ServerError, match="model 'm' failed on a batch of 2 rows: bad row"):
            await task
    assert_own_rows(await batcher.submit(request(4)), 4)  # the next batch is fine
    assert rig.model.sizes == [1, 2, 1]


async def test_stop_fails_queued_and_running_requests_with_unavailable(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=8)
    running = await busy_with_first_request(rig, batcher)
    queued = [asyncio.create_task(batcher.submit(request(i))) for i in (1, 2)]
    await wait_until(lambda: batcher.queued_rows == 2)
    await batcher.stop()

    with pytest.raises(Unavailable, match="model 'm' stopped"):
        await running
    for task in queued:
        with pytest.raises(Unavailable, match="model 'm' is shutting down"):
            await task
    with pytest.raises(Unavailable, match="model 'm' is not serving"):
        await batcher.submit(request(3))
    assert batcher.queued_rows == 0


async def test_submit_before_start_is_unavailable(rig: Rig) -> None:
    batcher = DynamicBatcher(
        rig.model, name="m", batchable=True, executor=rig.executor, metrics=rig.metrics
    )
    with pytest.raises(Unavailable, match="model 'm' is not serving"):
        await batcher.submit(request(1))
    with pytest.raises(Unavailable, match="not serving"):
        await batcher.submit(request(1, rows=40))  # the split path too
    assert rig.model.batches == []


async def test_a_non_batchable_model_runs_one_request_at_a_time(rig: Rig) -> None:
    batcher = await rig.start(batchable=False, max_batch_size=8)
    first = await busy_with_first_request(rig, batcher)
    # No batch dimension: a request is one unit, whatever its first dim.
    tasks = {i: asyncio.create_task(batcher.submit(request(i, rows=3))) for i in (1, 2, 3)}
    await wait_until(lambda: batcher.queued_rows == 3)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in tasks.items():
        assert_own_rows(await task, ident, rows=3)
    assert [batch.shape for batch in rig.model.batches] == [(1, 2), (3, 2), (3, 2), (3, 2)]


async def test_requests_of_different_shapes_are_never_concatenated(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=8)
    first = await busy_with_first_request(rig, batcher)
    widths = {1: 2, 2: 3, 3: 2, 4: 3}
    tasks = {i: asyncio.create_task(batcher.submit(request(i, width=w))) for i, w in widths.items()}
    await wait_until(lambda: batcher.queued_rows == 4)
    rig.model.open()
    assert_own_rows(await first, 0)
    for ident, task in tasks.items():
        assert_own_rows(await task, ident, width=widths[ident])
    assert sum(rig.model.sizes) == 5  # each request ran exactly once


async def test_a_preferred_size_runs_at_once_instead_of_waiting_out_the_delay(rig: Rig) -> None:
    # A delay far longer than the test's timeout: only a preferred size ends a wait.
    batcher = await rig.start(max_batch_size=8, max_queue_delay=60.0, preferred_batch_sizes=(2,))
    for pair in ((1, 2), (3, 4)):
        tasks = [asyncio.create_task(batcher.submit(request(i))) for i in pair]
        for ident, task in zip(pair, tasks, strict=True):
            assert_own_rows(await asyncio.wait_for(task, 10), ident)
    alone = asyncio.create_task(batcher.submit(request(5)))  # 1 row: not preferred, waits
    await asyncio.sleep(0.05)
    assert not alone.done()
    alone.cancel()
    assert rig.model.sizes == [2, 2]


async def test_instances_run_batches_at_the_same_time(rig: Rig) -> None:
    rig.executor.shutdown()
    rig.executor = ThreadPoolExecutor(2)
    batcher = await rig.start(max_batch_size=1, instances=2)
    rig.model.hold()
    tasks = [asyncio.create_task(batcher.submit(request(i))) for i in (1, 2, 3)]
    await wait_until(lambda: len(rig.model.batches) == 2)  # both held inside the model
    assert batcher.queued_rows == 1
    rig.model.open()
    for ident, task in enumerate(tasks, start=1):
        assert_own_rows(await task, ident)
    assert rig.model.sizes == [1, 1, 1]


async def test_the_retry_hint_grows_with_the_queue_and_the_row_time(rig: Rig) -> None:
    batcher = await rig.start(max_batch_size=1, max_queue_size=4, row_seconds=0.01)
    first = await busy_with_first_request(rig, batcher)
    queued = [asyncio.create_task(batcher.submit(request(i))) for i in range(1, 5)]
    await wait_until(lambda: batcher.queued_rows == 4)
    with pytest.raises(Overloaded) as caught:
        await batcher.submit(request(9))
    assert isinstance(caught.value, Overloaded)
    assert caught.value.retry_after == pytest.approx(0.050)  # (4 queued + 1) rows x 10 ms
    assert batcher.retry_after() == pytest.approx(0.040)
    rig.model.open()
    await asyncio.gather(first, *queued)
    assert batcher.retry_after() >= 0.001


async def test_a_batch_that_starts_alone_runs_on_the_wider_session(rig: Rig) -> None:
    wide = Model()
    rig.executor.shutdown(wait=True)
    rig.executor = ThreadPoolExecutor(2)
    batcher = await rig.start(instances=2, max_batch_size=1, run_alone=wide)  # type: ignore[arg-type]
    assert_own_rows(await batcher.submit(request(1)), 1)  # a quiet moment: every core
    wide.hold()
    lone = asyncio.create_task(batcher.submit(request(2)))
    await wait_until(lambda: len(wide.batches) == 2)
    # While that one runs, the next batch runs on the tuned session beside it.
    assert_own_rows(await batcher.submit(request(3)), 3)
    wide.open()
    assert_own_rows(await lone, 2)
    # Two at once: the first batch has the next waiting beside it, so neither is alone.
    four, five = await asyncio.gather(batcher.submit(request(4)), batcher.submit(request(5)))
    assert_own_rows(four, 4)
    assert_own_rows(five, 5)
    assert [int(b[0, 0]) for b in wide.batches] == [1, 2]
    assert [int(b[0, 0]) for b in rig.model.batches] == [3, 4, 5]
