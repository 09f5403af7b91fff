"""The real server on 127.0.0.1:0, through real stubs and the SDK."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import TINY_LABELS, TINY_SIZE, ServerThread, png_bytes
from tlserve.client import Client, InvalidInput, ModelNotFound
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture
def server(shared_server: ServerThread) -> ServerThread:
    """The tests here only call the server: they share one (tests/conftest.py)."""
    return shared_server


def _stub(server: ServerThread) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.target)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, TINY_SIZE, TINY_SIZE, 3), np.uint8)


def test_health_and_readiness_report_serving(server: ServerThread) -> None:
    channel, stub = _stub(server)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=5).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=5).ready


def test_server_metadata_names_the_provider(server: ServerThread) -> None:
    channel, stub = _stub(server)
    with channel:
        meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert meta.name == "tlserve"
    assert meta.parameters["execution_providers"].string_param == "CPUExecutionProvider"


def test_model_metadata_carries_tensors_provider_and_card(server: ServerThread) -> None:
    with Client(server.target) as client:
        meta = client.model_metadata("tiny", timeout=5)
    assert meta.versions == ("1",)
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [
        ("images", "UINT8", (-1, TINY_SIZE, TINY_SIZE, 3))
    ]
    assert {t.name for t in meta.outputs} == {"probabilities", "embeddings"}
    assert meta.execution_provider == "CPUExecutionProvider"
    assert meta.card is not None and meta.card.labels == TINY_LABELS


def test_raw_model_infer_matches_onnxruntime_in_process(
    server: ServerThread, model_repo: Path
) -> None:
    images = _images(5)
    with Client(server.target) as client:
        outputs = client.infer("tiny", {"images": images}, timeout=5)
    session = ort.InferenceSession(str(model_repo / "tiny" / "1" / "model.onnx"))
    expected = dict(
        zip(
            ["probabilities", "embeddings"],
            session.run(["probabilities", "embeddings"], {"images": images}),
            strict=True,
        )
    )
    np.testing.assert_array_equal(outputs["probabilities"], expected["probabilities"])
    np.testing.assert_array_equal(outputs["embeddings"], expected["embeddings"])


def test_typed_contents_and_requested_outputs(server: ServerThread) -> None:
    images = _images(2, seed=1)
    request = pb.ModelInferRequest(model_name="tiny", id="req-7")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    tensor.contents.uint_contents.extend(images.flatten().tolist())
    request.outputs.add(name="probabilities")
    channel, stub = _stub(server)
    with channel:
        response = stub.ModelInfer(request, timeout=5)
    assert response.id == "req-7"
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert list(response.outputs[0].shape) == [2, len(TINY_LABELS)]
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, -1)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_classify_decodes_and_labels_real_images(server: ServerThread) -> None:
    with Client(server.target) as client:
        results = client.classify(
            [png_bytes((250, 10, 10)), png_bytes((10, 240, 10)), png_bytes((5, 5, 255))],
            model="tiny",
            top_k=2,
            timeout=5,
        )
    assert [r[0].label for r in results] == ["red", "green", "blue"]
    assert all(len(r) == 2 and r[0].score > r[1].score for r in results)
    assert results[0][0].index == 0


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"images": np.zeros((1, TINY_SIZE, TINY_SIZE, 3), np.float32)}, "is FP32 but model"),
        ({"images": np.zeros((1, 3, TINY_SIZE, TINY_SIZE), np.uint8)}, "has shape [1, 3, 8, 8]"),
        ({"pixels": np.zeros((1, TINY_SIZE, TINY_SIZE, 3), np.uint8)}, "missing ['images']"),
        ({"images": np.zeros((0, TINY_SIZE, TINY_SIZE, 3), np.uint8)}, "batch of 0 rows"),
    ],
)
def test_bad_tensors_get_invalid_argument_and_server_keeps_serving(
    server: ServerThread, inputs: dict[str, np.ndarray], fragment: str
) -> None:
    with Client(server.target) as client:
        with pytest.raises(InvalidInput, match="INVALID_ARGUMENT") as caught:
            client.infer("tiny", inputs, timeout=5)
        assert fragment in str(caught.value)
        assert isinstance(caught.value.__cause__, grpc.RpcError)
        assert client.infer("tiny", {"images": _images(1)}, timeout=5)["probabilities"].shape == (
            1,
            3,
        )


def test_raw_contents_of_the_wrong_length(server: ServerThread) -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, TINY_SIZE, TINY_SIZE, 3])
    request.raw_input_contents.append(b"\x00" * 10)
    channel, stub = _stub(server)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw contents are 10 bytes" in caught.value.details()


def test_unknown_model_and_version_get_not_found(server: ServerThread) -> None:
    with Client(server.target) as client:
        with pytest.raises(ModelNotFound, match="no model named 'nope' \\(loaded: tiny\\)"):
            client.infer("nope", {"images": _images(1)}, timeout=5)
        with pytest.raises(ModelNotFound, match="no version '7'"):
            client.classify(png_bytes((1, 2, 3)), model="tiny", version="7", timeout=5)


def test_undecodable_image_names_the_image(server: ServerThread) -> None:
    with Client(server.target) as client:
        with pytest.raises(InvalidInput, match="image 1: cannot decode image"):
            client.classify([png_bytes((1, 2, 3)), b"not an image"], model="tiny", timeout=5)
        assert client.classify(png_bytes((250, 0, 0)), model="tiny", timeout=5)[0][0].label == "red"


def test_metrics_page_counts_requests_by_outcome(model_repo: Path) -> None:
    server = ServerThread(model_repo)  # its own: it counts requests from zero
    try:
        _count_requests_by_outcome(server)
    finally:
        server.stop()


def _count_requests_by_outcome(server: ServerThread) -> None:
    with Client(server.target) as client:
        client.classify(png_bytes((250, 0, 0)), model="tiny", timeout=5)
        with pytest.raises(ModelNotFound):
            client.classify(png_bytes((250, 0, 0)), model="ghost", timeout=5)
    page = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert 'tlserve_requests_total{api="Classify",model="tiny",outcome="OK"} 1.0' in page
    assert 'tlserve_requests_total{api="Classify",model="unknown",outcome="NOT_FOUND"} 1.0' in page
    for name in (
        "tlserve_request_duration_seconds_bucket",
        "tlserve_queue_duration_seconds_bucket",
        "tlserve_compute_duration_seconds_bucket",
        "tlserve_preprocess_duration_seconds_bucket",
        "tlserve_batch_size_bucket",
    ):
        assert name in page
    assert (
        'tlserve_model_loaded{model="tiny",provider="CPUExecutionProvider",version="1"} 1.0' in page
    )


def test_newest_version_is_served_and_half_written_ones_ignored(model_repo: Path) -> None:
    from tests.support import build_tiny_classifier

    build_tiny_classifier(model_repo / "tiny" / "2" / "model.onnx", labels=("a", "b", "c", "d"))
    (model_repo / "tiny" / ".tmp-123").mkdir()
    (model_repo / "tiny" / "3").mkdir()  # no model.onnx yet
    running = ServerThread(model_repo)
    try:
        with Client(running.target) as client:
            meta = client.model_metadata("tiny", timeout=5)
        assert meta.versions == ("2",)
        assert meta.card is not None and meta.card.labels == ("a", "b", "c", "d")
    finally:
        running.stop()


def test_a_model_that_fails_to_load_keeps_the_server_not_ready(model_repo: Path) -> None:
    broken = model_repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"garbage")
    running = ServerThread(model_repo)
    try:
        with Client(running.target) as client:
            assert not client.server_ready(timeout=5)
            assert (
                client.classify(png_bytes((0, 0, 250)), model="tiny", timeout=5)[0][0].label
                == "blue"
            )
    finally:
        running.stop()


def test_reflection_lists_the_services(server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "tlserve.v1.ImageService",
        "grpc.health.v1.Health",
    } <= names


def test_embed_returns_the_backbone_features_per_image(server: ServerThread) -> None:
    from tlserve.protos import tlserve_v1_pb2 as v1
    from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = v1_grpc.ImageServiceStub(channel)
        reply = stub.Embed(
            v1.EmbedRequest(
                model_name="tiny", images=[png_bytes((255, 0, 0)), png_bytes((0, 0, 51))]
            ),
            timeout=5,
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(v1.EmbedRequest(model_name="tiny"), timeout=5)
    assert (reply.model_name, reply.model_version) == ("tiny", "1")
    embeddings = np.array([list(e.values) for e in reply.embeddings])
    np.testing.assert_allclose(embeddings, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.2]], atol=1e-6)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_classify_stream_answers_in_order_and_survives_a_bad_request(server: ServerThread) -> None:
    from tlserve.protos import tlserve_v1_pb2 as v1
    from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc

    colours = [(250, 0, 0), (0, 250, 0), None, (0, 0, 250)] * 5
    requests = [
        v1.ClassifyRequest(
            model_name="tiny",
            id=str(i),
            top_k=1,
            images=[png_bytes(c) if c else b"not an image"],
        )
        for i, c in enumerate(colours)
    ]
    with grpc.insecure_channel(server.target) as channel:
        answers = list(v1_grpc.ImageServiceStub(channel).ClassifyStream(iter(requests), timeout=10))
    assert [a.response.id for a in answers] == [str(i) for i in range(len(colours))]
    for answer, colour in zip(answers, colours, strict=True):
        if colour is None:
            assert answer.error_message.startswith("INVALID_ARGUMENT: image 0: cannot decode")
        else:
            assert not answer.error_message
            expected = ("red", "green", "blue")[colour.index(250)]
            assert answer.response.results[0].labels[0].label == expected


def test_model_stream_infer_through_our_stub(server: ServerThread) -> None:
    from tlserve.contract.codec import encode_request_inputs

    def request(i: int, rows: int) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="tiny", id=str(i))
        encode_request_inputs(message, {"images": _images(rows, seed=i)})
        return message

    requests = [request(0, 1), request(1, 2), pb.ModelInferRequest(model_name="ghost", id="2")]
    channel, stub = _stub(server)
    with channel:
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=10))
    assert [a.infer_response.id for a in answers] == ["0", "1", "2"]
    assert [a.infer_response.outputs[0].shape[0] for a in answers[:2]] == [1, 2]
    assert answers[2].error_message.startswith("NOT_FOUND: no model named 'ghost'")
