"""Admission measured in time: the queue-time bound, the adaptive call limit under a
10x change of compute time, and the close of a drain (the refusal of a request whose
deadline the wait would pass is in test_overload.py)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.server.gates import install_gate
from tests.support import TINY_SIZE, ServerThread
from tlserve.contract.codec import encode_request_inputs
from tlserve.contract.errors import Overloaded
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.server.batching.batcher import DynamicBatcher
from tlserve.server.edge.limit import AdaptiveLimit
from tlserve.server.metrics import ServerMetrics

Arrays = dict[str, np.ndarray]


def _request(seed: int = 0) -> pb.ModelInferRequest:
    images = np.random.default_rng(seed).integers(0, 256, (1, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    request = pb.ModelInferRequest(model_name="tiny")
    encode_request_inputs(request, {"images": images})
    return request


def test_work_past_the_queue_time_limit_is_refused_with_the_time_to_drain(
    model_repo: Path,
) -> None:
    running = ServerThread(model_repo, max_batch_size=1, max_queue_time=0.5)
    try:
        gate = install_gate(running.running)
        batcher = running.running.core.registry.get("tiny").batcher
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            busy = stub.ModelInfer.future(_request(), timeout=30)
            gate.wait_entered(1)
            batcher.speed.measured(1, 0.2)  # 40 ms a row: 200 ms weigh 0.2 of the estimate
            row = batcher.speed.row_seconds
            queued = stub.ModelInfer.future(_request(seed=1), timeout=30)
            deadline = time.monotonic() + 10
            while batcher.queued_rows < 1:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            fits = int(0.5 / row) - 2  # rows that still fit beside the running and queued
            more = [stub.ModelInfer.future(_request(seed=2 + i), timeout=30) for i in range(fits)]
            while batcher.queued_rows < 1 + fits:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(_request(seed=99), timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "past its limit of 500 ms" in caught.value.details()
            hint = dict(caught.value.trailing_metadata())["retry-after-ms"]
            assert int(hint) > 250  # the queue's drain, not the few ms it is over the limit
            gate.open()
            assert [f.result(timeout=10).model_name for f in [busy, queued, *more]]
        body = urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()
        assert 'tlserve_shed_requests_total{model="tiny",reason="queue_time"} 1.0' in body
        assert 'tlserve_queue_time_estimate_seconds{model="tiny"}' in body
    finally:
        running.stop()


class Timed:
    """A model whose compute time per row the test sets (``row_seconds``)."""

    def __init__(self, row_seconds: float) -> None:
        self.row_seconds = row_seconds

    def __call__(self, feeds: Arrays) -> Arrays:
        x = feeds["x"]
        time.sleep(self.row_seconds * len(x))
        return {"y": x}


@pytest.fixture
async def timed() -> AsyncIterator[tuple[Timed, DynamicBatcher]]:
    model, executor = Timed(0.002), ThreadPoolExecutor(1)
    batcher = DynamicBatcher(
        model, name="m", batchable=True, executor=executor,
        metrics=ServerMetrics(CollectorRegistry()), max_batch_size=4, row_seconds=0.002,
    )  # fmt: skip
    await batcher.start()
    yield model, batcher
    await batcher.stop()
    executor.shutdown(wait=True)


async def test_the_call_limit_follows_a_tenfold_change_of_compute_time(
    timed: tuple[Timed, DynamicBatcher],
) -> None:
    model, batcher = timed
    limit = AdaptiveLimit(
        16, floor=1, ceiling=16, target=0.1, queue_time=batcher.expected_wait, clock=time.monotonic
    )
    inflight = 0

    async def caller(until: float) -> None:
        # As the admission interceptor does: take a unit of the limit or wait for one.
        nonlocal inflight
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            if inflight >= limit.value:
                await asyncio.sleep(0.001)
                continue
            inflight += 1
            try:
                await batcher.submit({"x": np.zeros((1, 2))})
            except Overloaded:
                pass
            finally:
                inflight -= 1
                limit.update(inflight)

    async def phase(seconds: float) -> int:
        until = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(caller(until) for _ in range(16)))
        return limit.value

    assert await phase(0.5) == 16  # 2 ms a row: 16 rows are 32 ms, under the 100 ms that cut
    model.row_seconds = 0.02  # ten times slower: 16 rows would be 320 ms queued
    slow = await phase(2.0)
    assert slow <= 6, slow  # a wait under the target is at most 5 rows of 20 ms
    model.row_seconds = 0.002
    assert await phase(2.0) >= 10  # fast again: it grows back


def test_calls_as_the_drain_closes_get_unavailable_never_cancelled(model_repo: Path) -> None:
    running = ServerThread(model_repo)
    codes: dict[str, int] = {}
    stopped = threading.Event()

    def caller() -> None:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stopped.is_set():
                try:
                    stub.ModelInfer(_request(), timeout=10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        while codes.get("OK", 0) < 50:
            time.sleep(0.01)
        running.call(running.running.stop(drain_delay=0.3, grace=2.0))
        time.sleep(0.2)  # callers keep sending at the stopped server
    finally:
        stopped.set()
        for thread in threads:
            thread.join(timeout=30)
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(timeout=10)
        running.loop.close()
    assert "CANCELLED" not in codes, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
