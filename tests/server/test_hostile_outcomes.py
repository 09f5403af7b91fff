"""Failures counted with their real code, logged once, echoed short."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.server.gates import install_gate
from tests.support import TINY_SIZE, ServerThread, png_bytes
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc
from tlserve.server.edge import handling
from tlserve.server.edge.handling import MAX_DETAILS, details


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, TINY_SIZE, TINY_SIZE, 3])
    request.raw_input_contents.append(bytes(3 * TINY_SIZE * TINY_SIZE))
    return request


def _counted(server: ServerThread, api: str, outcome: str, model: str = "tiny") -> float:
    labels = {"model": model, "api": api, "outcome": outcome}
    value = server.running.core.metrics.registry.get_sample_value("tlserve_requests_total", labels)
    return value or 0.0


def _inferences(server: ServerThread, outcome: str) -> float:
    labels = {"model": "tiny", "version": "1", "outcome": outcome}
    registry = server.running.core.metrics.registry
    return registry.get_sample_value("tlserve_inferences_total", labels) or 0.0


def _eventually(check: object, server: ServerThread, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        samples = [
            (sample.labels, sample.value)
            for metric in server.running.core.metrics.registry.collect()
            if metric.name == "tlserve_requests"
            for sample in metric.samples
            if sample.name == "tlserve_requests_total"
        ]
        assert time.monotonic() < deadline, f"never happened: {samples}"
        time.sleep(0.02)


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def test_a_deadline_that_passes_in_the_queue_is_counted_as_deadline_exceeded(
    server: ServerThread, channel: grpc.Channel
) -> None:
    gate = install_gate(server.running)  # the model is busy until the gate opens
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    calls = [stub.ModelInfer.future(_request(), timeout=0.5) for _ in range(3)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    gate.open()
    # The alert on DEADLINE_EXCEEDED fires: nothing is counted as CANCELLED.
    _eventually(lambda: _counted(server, "ModelInfer", "DEADLINE_EXCEEDED") == 3, server)
    assert _counted(server, "ModelInfer", "CANCELLED") == 0
    assert _inferences(server, "CANCELLED") == 0  # the per-model count agrees
    assert _inferences(server, "DEADLINE_EXCEEDED") == 3


def test_a_call_the_caller_cancels_is_counted_as_cancelled(
    server: ServerThread, channel: grpc.Channel
) -> None:
    gate = install_gate(server.running)
    call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(_request(), timeout=30)
    gate.wait_entered(1)
    call.cancel()
    _eventually(lambda: _counted(server, "ModelInfer", "CANCELLED") == 1, server)
    gate.open()
    assert _counted(server, "ModelInfer", "DEADLINE_EXCEEDED") == 0
    _eventually(lambda: _inferences(server, "CANCELLED") == 1, server)


def test_stream_messages_past_the_deadline_are_counted_as_deadline_exceeded(
    server: ServerThread, channel: grpc.Channel
) -> None:
    gate = install_gate(server.running)
    stream = v1_grpc.ImageServiceStub(channel).ClassifyStream
    request = v1.ClassifyRequest(model_name="tiny", images=[png_bytes((9, 9, 9))])
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(iter([request] * 2), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    gate.open()

    def settled() -> bool:
        expired = _counted(server, "ClassifyStream", "DEADLINE_EXCEEDED")
        # On a loaded machine the second message may reach the model only after the
        # gate opens and finish OK; what must never happen is a CANCELLED count.
        return expired >= 1 and expired + _counted(server, "ClassifyStream", "OK") == 2

    _eventually(settled, server)
    assert _counted(server, "ClassifyStream", "CANCELLED") == 0


def test_a_20_kb_model_name_is_not_found_with_a_short_message(
    server: ServerThread, channel: grpc.Channel
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _request()
    request.model_name = "m" * 20_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    # It used to echo the whole name: RESOURCE_EXHAUSTED "metadata size exceeds hard limit".
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert len(caught.value.details()) <= MAX_DETAILS  # type: ignore[attr-defined]


def test_details_are_cut_to_their_limit_and_say_how_long_they_were() -> None:
    assert details(ValueError("short")) == "short"
    cut = details(ValueError("x" * 20_000))
    assert len(cut) <= MAX_DETAILS
    assert cut.endswith("(20000 characters)")


def test_bad_input_logs_one_warning_line_a_second_and_no_traceback(
    server: ServerThread,
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fresh limiter: earlier tests' refusals must not silence this one's first line.
    monkeypatch.setattr(handling, "_warnings", handling._RateLimitedWarnings(interval=1.0))
    garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    classify = v1_grpc.ImageServiceStub(channel).Classify
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="tlserve"):
        for i in range(40):
            with pytest.raises(grpc.RpcError):
                garbage(b"\x0a\x7f" + bytes([i]), timeout=10)
            with pytest.raises(grpc.RpcError):
                classify(v1.ClassifyRequest(model_name="tiny", images=[b"BM" * 9]), timeout=10)
    elapsed = time.monotonic() - started
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all(r.levelno == logging.WARNING for r in refused)
    assert len(refused) <= elapsed + 2
    assert not [r for r in caplog.records if r.exc_info]
    assert _counted(server, "ModelInfer", "INVALID_ARGUMENT", model="unknown") == 40
    # Counted as the answer goes out: the last one may land just after the caller has it.
    _eventually(lambda: _counted(server, "Classify", "INVALID_ARGUMENT") == 40, server)


def test_an_unknown_method_is_unimplemented_and_counted(
    server: ServerThread, channel: grpc.Channel
) -> None:
    for method in ("/inference.GRPCInferenceService/Nope", "/a.B/C"):
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(method)(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    _eventually(lambda: _counted(server, "unknown", "UNIMPLEMENTED", model="unknown") == 2, server)


def test_a_typed_client_still_gets_answers(server: ServerThread, channel: grpc.Channel) -> None:
    # The pass-through deserializer changes nothing a well-formed caller sees.
    answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=10)
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).shape == (3,)


def test_health_watch_still_streams_its_status(server: ServerThread, channel: grpc.Channel) -> None:
    # Watch writes with context.write (a coroutine, not a generator): guarded all the same.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_answers_and_refuses_bytes_that_do_not_parse(
    server: ServerThread, channel: grpc.Channel
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    [answer] = list(stub.ServerReflectionInfo(iter([ask]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert "tlserve.v1.ImageService" in names
    raw = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as caught:
        list(raw(iter([b"\x0a\x7f"]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
