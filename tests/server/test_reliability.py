"""Overload, deadlines, instances and splitting: a real server on loopback.

The model is held at a :class:`Gate` so that "the queue is full" and "the
model is busy" are states the test sets up; assertions are on counts
(statistics, the gate's batches), never on durations.
"""

from __future__ import annotations

import gc
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.server.gates import install_gate
from tests.support import TINY_SIZE, ServerThread
from tlserve.contract.codec import encode_request_inputs
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc


def _request(rows: int, seed: int = 0) -> pb.ModelInferRequest:
    images = np.random.default_rng(seed).integers(0, 256, (rows, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    request = pb.ModelInferRequest(model_name="tiny")
    encode_request_inputs(request, {"images": images})
    return request


def _stats(stub: pb_grpc.GRPCInferenceServiceStub) -> pb.ModelStatistics:
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"), timeout=5)
    [stats] = reply.model_stats
    return stats


@pytest.fixture
def small_queue(model_repo: Path) -> Iterator[ServerThread]:
    running = ServerThread(model_repo, max_queue_size=4, max_batch_size=4)
    yield running
    running.stop()


def test_overload_is_refused_at_once_with_a_retry_hint_and_no_growth(
    small_queue: ServerThread,
) -> None:
    gate = install_gate(small_queue.running)
    with grpc.insecure_channel(small_queue.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = stub.ModelInfer.future(_request(1), timeout=30)
        gate.wait_entered(1)
        queued = [stub.ModelInfer.future(_request(1, seed=i), timeout=30) for i in range(4)]
        batcher = small_queue.running.core.registry.get("tiny").batcher
        while batcher.queued_rows < 4:
            pass

        def refused() -> int:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(_request(1), timeout=5)
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 4" in error.details()
            [hint] = [v for k, v in error.trailing_metadata() if k == "retry-after-ms"]
            return int(hint)

        hints = [refused() for _ in range(50)]  # warm-up: caches, channel buffers
        assert all(hint >= 1 for hint in hints)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(300):
            refused()
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert growth < 256 * 1024, f"{growth} bytes kept after 300 refusals"
        assert batcher.queued_rows == 4  # refusals never took queue room
        page = urllib.request.urlopen(small_queue.metrics_url, timeout=5).read().decode()
        assert 'tlserve_queue_depth{model="tiny"} 4.0' in page
        assert 'tlserve_inflight_requests{model="tiny"} 5.0' in page
        refusals = 'tlserve_inferences_total{model="tiny",outcome="RESOURCE_EXHAUSTED",version="1"}'
        assert f"{refusals} 350.0" in page

        gate.open()
        assert busy.result(timeout=10).model_name == "tiny"
        assert all(f.result(timeout=10).model_name == "tiny" for f in queued)
        stats = _stats(stub)
    assert stats.inference_count == 5  # the refused requests never reached the model
    assert stats.inference_stats.success.count == 5


def test_deadlines_shorter_than_the_queue_wait_never_run_the_model(server: ServerThread) -> None:
    gate = install_gate(server.running)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = stub.ModelInfer.future(_request(1), timeout=30)
        gate.wait_entered(1)
        late = [stub.ModelInfer.future(_request(2, seed=i), timeout=0.2) for i in range(5)]
        for future in late:
            with pytest.raises(grpc.RpcError) as caught:
                future.result(timeout=10)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.open()
        assert busy.result(timeout=10).model_name == "tiny"
        stub.ModelInfer(_request(3), timeout=10)  # the model still serves
        stats = _stats(stub)
    assert gate.entered == 2 and gate.rows == 1 + 3  # none of the late rows ran
    assert stats.inference_count == 4
    assert stats.execution_count == 2


def test_instances_run_batches_concurrently(model_repo: Path) -> None:
    running = ServerThread(model_repo, instances=2, max_batch_size=1)
    try:
        gate = install_gate(running.running)
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            futures = [stub.ModelInfer.future(_request(1, seed=i), timeout=30) for i in range(3)]
            gate.wait_entered(2)  # two batches inside the model at once, the third queued
            assert gate.entered == 2
            gate.open()
            assert [f.result(timeout=10).model_name for f in futures] == ["tiny"] * 3
            config = stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=5).config
        assert config.instance_group[0].count == 2
    finally:
        running.stop()


def test_a_request_larger_than_the_max_batch_is_split_and_rejoined(model_repo: Path) -> None:
    running = ServerThread(model_repo, max_batch_size=4, max_queue_size=64)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            whole = stub.ModelInfer(_request(10, seed=5), timeout=10)
            stats = _stats(stub)
    finally:
        running.stop()
    reference = ServerThread(running.config.model_repository)
    try:
        with grpc.insecure_channel(reference.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            expected = stub.ModelInfer(_request(10, seed=5), timeout=10)
    finally:
        reference.stop()
    assert whole.outputs[0].shape[0] == 10
    assert whole.raw_output_contents == expected.raw_output_contents
    assert stats.inference_count == 10
    assert stats.execution_count == 3  # 4 + 4 + 2 rows
    assert max(b.batch_size for b in stats.batch_stats) == 4
