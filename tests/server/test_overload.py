"""Shedding load on a real server: the RPC bound, requests that never fit, late requests.

The model is held at a :class:`Gate`, so "the server is full" and "the queue
is long" are states the test sets up; assertions are on codes and counts,
never on durations but one: a refusal on arrival comes long before the
deadline it refuses for.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.gates import install_gate
from tests.support import TINY_SIZE, ServerThread, build_tiny_classifier
from tlserve.contract.codec import encode_request_inputs
from tlserve.contract.errors import ConfigError
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.server.config import CONTROL_RPC_ROOM, ServerConfig


def _request(rows: int = 1, seed: int = 0) -> pb.ModelInferRequest:
    images = np.random.default_rng(seed).integers(0, 256, (rows, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    request = pb.ModelInferRequest(model_name="tiny")
    encode_request_inputs(request, {"images": images})
    return request


def _metric(running: ServerThread, line: str) -> bool:
    return line in urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()


def test_the_call_bounds_default_to_three_batches_and_a_quarter_per_connection(
    tmp_path: Path,
) -> None:
    config = ServerConfig.load(
        {"model_repository": tmp_path, "max_batch_size": 32, "instances": 2}, environ={}
    )
    assert config.max_concurrent_rpcs == 3 * 2 * 32
    assert config.max_streams_per_connection == 3 * 2 * 32 // 4
    config = ServerConfig.load({"model_repository": tmp_path, "max_batch_size": 1}, environ={})
    assert (config.max_concurrent_rpcs, config.max_streams_per_connection) == (32, 16)
    assert ServerConfig.load({"model_repository": tmp_path}, environ={}).max_concurrent_rpcs == 96
    env = {"TLSERVE_MAX_CONCURRENT_RPCS": "12", "TLSERVE_MAX_STREAMS_PER_CONNECTION": "5"}
    config = ServerConfig.load({"model_repository": tmp_path}, environ=env)
    assert (config.max_concurrent_rpcs, config.max_streams_per_connection) == (12, 5)


def test_the_queue_policy_is_checked_at_start_up(tmp_path: Path) -> None:
    fifo = ServerConfig.load({"model_repository": tmp_path, "queue_policy": "fifo"}, environ={})
    assert fifo.queue_policy == "fifo"
    assert ServerConfig.load({"model_repository": tmp_path}, environ={}).queue_policy == (
        "adaptive-lifo"
    )
    with pytest.raises(ConfigError, match="TLSERVE_QUEUE_POLICY must be one of"):
        ServerConfig.load({"model_repository": tmp_path}, environ={"TLSERVE_QUEUE_POLICY": "lifo"})


def test_inference_calls_past_the_bound_are_refused_unread_and_health_still_answers(
    model_repo: Path,
) -> None:
    running = ServerThread(model_repo, max_concurrent_rpcs=3, max_streams_per_connection=10)
    try:
        gate = install_gate(running.running)
        batcher = running.running.core.registry.get("tiny").batcher
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            held = [stub.ModelInfer.future(_request(seed=i), timeout=30) for i in range(3)]
            gate.wait_entered(1)
            deadline = time.monotonic() + 30
            # All three are inside the server: at the gate or queued behind it
            # (the first batch may already hold two of them).
            while gate.rows + batcher.queued_rows < 3:
                assert time.monotonic() < deadline, "the calls never reached the queue"
                time.sleep(0.002)
            garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for call, message in ((stub.ModelInfer, _request()), (garbage, b"\xff" * 64)):
                with pytest.raises(grpc.RpcError) as caught:
                    call(message, timeout=5)
                # RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: the bytes were never parsed.
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "3 inference calls, its limit" in caught.value.details()
                assert any(k == "retry-after-ms" for k, _ in caught.value.trailing_metadata())
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1  # SERVING
            assert stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=5).name
            gate.open()
            assert [f.result(timeout=10).model_name for f in held] == ["tiny"] * 3
            stub.ModelInfer(_request(), timeout=10)  # room again
        assert gate.rows == 4  # the refused calls never reached the model
        refusals = 'tlserve_requests_total{api="ModelInfer",model="unknown",'
        assert _metric(running, refusals + 'outcome="RESOURCE_EXHAUSTED"} 2.0')
    finally:
        running.stop()


def test_calls_past_the_per_connection_limit_wait_their_turn_on_the_callers_side(
    model_repo: Path,
) -> None:
    # One channel, six times more calls in flight than its stream limit, no
    # retries: every call is answered, none is refused (REFUSED_STREAM).
    running = ServerThread(model_repo, max_streams_per_connection=4)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(_request(), timeout=10)  # the limit is known to the client
            for _ in range(10):
                calls = [stub.ModelInfer.future(_request(seed=i), timeout=30) for i in range(24)]
                assert [c.result().model_name for c in calls] == ["tiny"] * 24
    finally:
        running.stop()


def test_a_request_that_can_never_fit_the_queue_is_invalid(model_repo: Path) -> None:
    running = ServerThread(model_repo, max_queue_size=4, max_batch_size=2)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(_request(rows=5), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details()
            assert "5 rows can never fit: model 'tiny' queues at most 4 rows" in details
            assert not any(k == "retry-after-ms" for k, _ in caught.value.trailing_metadata())
            assert stub.ModelInfer(_request(rows=4), timeout=10).outputs[0].shape[0] == 4
        assert _metric(running, 'tlserve_shed_requests_total{model="tiny",reason="too_large"} 1.0')
    finally:
        running.stop()


def test_a_request_the_queue_cannot_answer_in_time_is_refused_without_running(
    model_repo: Path,
) -> None:
    # A queue-time bound past the wait below: the deadline alone refuses.
    server = ServerThread(model_repo, max_queue_time=3600.0)
    try:
        _late_request_refused(server)
    finally:
        server.stop()


def _late_request_refused(
    server: ServerThread,
    told: str = "no model can answer in time",
    unparsable: bytes = b"\x0a\x7f",
) -> None:
    gate = install_gate(server.running)
    batcher = server.running.core.registry.get("tiny").batcher
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = stub.ModelInfer.future(_request(), timeout=30)
        gate.wait_entered(1)
        batcher.speed.measured(1, 1000.0)  # as if a row took 1000 s: the estimate passes 5 s
        sent = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_request(seed=1), timeout=5)
        # Told on arrival, not at its deadline (half of it: a wide margin for a busy host).
        assert time.monotonic() - sent < 2.5
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert told in caught.value.details() and "(refused unparsed)" in caught.value.details()
        # ...with the time it still had, so the caller can tell what it spent on its own side
        # (gRPC rounds the timeout it sends up, so this can pass 5 s by a few ms).
        left = dict(caught.value.trailing_metadata())["deadline-left-ms"]
        assert 2500 < int(left) <= 5100
        assert batcher.queued_rows == 0  # refused before it took room
        # Refused before its message is parsed: bytes that are no message at all
        # get the same answer, not INVALID_ARGUMENT.
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            garbage(unparsable, timeout=5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.open()
        assert busy.result(timeout=10).model_name == "tiny"
        # Without a deadline nothing is refused for being slow.
        assert stub.ModelInfer(_request(seed=2)).model_name == "tiny"
    assert gate.rows == 2  # the late requests never ran
    assert _metric(server, 'tlserve_shed_requests_total{model="tiny",reason="late"} 2.0')
    assert _metric(
        server,
        'tlserve_requests_total{api="ModelInfer",model="unknown",outcome="DEADLINE_EXCEEDED"} 2.0',
    )


def test_beside_an_idle_model_a_late_call_is_refused_by_its_own_model_before_the_parse(
    model_repo: Path,
) -> None:
    # "No model can answer in time" is never true beside an idle model: the
    # call is judged again by the model its bytes name, before they are parsed
    # (the name, then a string field that is not UTF-8, which the parse refuses).
    build_tiny_classifier(model_repo / "idle" / "1" / "model.onnx")
    server = ServerThread(model_repo)
    try:
        _late_request_refused(server, "model 'tiny' has about", b"\x0a\x04tiny\x1a\x02\xff\xfe")
        with grpc.insecure_channel(server.target) as channel:
            idle = pb.ModelInferRequest(model_name="idle")
            zeros = np.zeros((1, TINY_SIZE, TINY_SIZE, 3), np.uint8)
            encode_request_inputs(idle, {"images": zeros})
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(idle, timeout=5).model_name == "idle"
    finally:
        server.stop()


def test_grpc_itself_refuses_every_call_past_the_bound_plus_room_for_control_calls(
    model_repo: Path,
) -> None:
    running = ServerThread(model_repo, max_concurrent_rpcs=1, max_streams_per_connection=64)
    hard_bound = 1 + CONTROL_RPC_ROOM
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # Watch streams stay open: each holds one call in the server.
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(hard_bound)]
            for watch in watches:
                assert next(watch).status == 1  # SERVING: the call is inside the server
            with pytest.raises(grpc.RpcError) as caught:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for watch in watches:
                watch.cancel()
            deadline = time.monotonic() + 30
            while True:  # the cancelled streams leave the server
                try:
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the bound never freed"
                    time.sleep(0.05)
    finally:
        running.stop()


def test_a_unary_call_that_sends_no_message_is_invalid(model_repo: Path) -> None:
    # Admission takes unary calls as client streams (to refuse them unread): one
    # that ends without its message is answered as gRPC's unary handler would be.
    running = ServerThread(model_repo)
    try:
        with grpc.insecure_channel(running.target) as channel:
            empty = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as caught:
                empty(iter(()), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "carried none" in caught.value.details()
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(_request(), timeout=10).model_name == "tiny"
    finally:
        running.stop()
