"""tritonclient, a real third-party V2 client, against tlserve in the same process.

Sync and ``aio`` clients; raw and typed contents; metadata, config,
statistics, streaming and the repository extension.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support import TINY_LABELS, TINY_SIZE, ServerThread
from tlserve.client import Client


def _images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, TINY_SIZE, TINY_SIZE, 3), np.uint8)


def _input(images: np.ndarray) -> triton.InferInput:
    infer_input = triton.InferInput("images", list(images.shape), "UINT8")
    infer_input.set_data_from_numpy(images)
    return infer_input


@pytest.fixture
def client(server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=server.target)
    yield connection
    connection.close()


def test_tritonclient_speaks_to_tlserve(server: ServerThread) -> None:
    client = triton.InferenceServerClient(url=server.target)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta.inputs[0].name == "images" and meta.inputs[0].datatype == "UINT8"

        images = _images(4)
        result = client.infer(
            "tiny", [_input(images)], outputs=[triton.InferRequestedOutput("probabilities")]
        )
        probabilities = result.as_numpy("probabilities")
    finally:
        client.close()
    with Client(server.target) as ours:  # both clients live in one process
        expected = ours.infer("tiny", {"images": images}, timeout=5)["probabilities"]
    np.testing.assert_array_equal(probabilities, expected)


def test_server_metadata_lists_the_extensions(client: triton.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "tlserve"
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta.extensions)


def test_model_config_describes_the_model_as_triton_would(
    client: triton.InferenceServerClient,
) -> None:
    config = client.get_model_config("tiny").config
    assert (config.name, config.platform, config.backend) == (
        "tiny",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 32
    [images] = config.input
    assert images.name == "images" and images.data_type == triton.model_config_pb2.TYPE_UINT8
    assert list(images.dims) == [TINY_SIZE, TINY_SIZE, 3]  # no batch dimension, as in Triton
    assert images.format == triton.model_config_pb2.ModelInput.FORMAT_NHWC
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {"probabilities": [len(TINY_LABELS)], "embeddings": [3]}
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.instance_group[0].count == 1
    assert config.instance_group[0].kind == triton.model_config_pb2.ModelInstanceGroup.KIND_CPU
    as_json = client.get_model_config("tiny", as_json=True)
    assert as_json["config"]["max_batch_size"] == 32
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.get_model_config("nope")


def test_statistics_count_requests_rows_and_batches(client: triton.InferenceServerClient) -> None:
    client.infer("tiny", [_input(_images(3))])
    client.infer("tiny", [_input(_images(1))])
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [_input(np.zeros((1, 2, 2, 3), np.uint8))])  # wrong shape
    [stats] = client.get_inference_statistics("tiny").model_stats
    assert (stats.name, stats.version) == ("tiny", "1")
    assert stats.inference_count == 4 and stats.execution_count == 2
    assert stats.inference_stats.success.count == 2
    assert stats.inference_stats.fail.count == 1
    assert stats.inference_stats.queue.count == 2
    assert stats.inference_stats.compute_infer.count == 2
    assert stats.inference_stats.compute_infer.ns > 0
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 1, 3: 1}
    assert stats.last_inference > 0
    every = client.get_inference_statistics().model_stats
    assert [s.name for s in every] == ["tiny"]


def test_typed_contents_through_triton_s_own_stub(server: ServerThread) -> None:
    images = _images(2, seed=9)
    request = triton_pb2.ModelInferRequest(model_name="tiny", id="typed")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    tensor.contents.uint_contents.extend(images.flatten().tolist())
    with grpc.insecure_channel(server.target) as channel:
        response = triton_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    result = triton.InferResult(response)
    with Client(server.target) as ours:
        expected = ours.infer("tiny", {"images": images}, timeout=5)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected["probabilities"])
    assert response.id == "typed"


def test_streaming_answers_every_request_in_order(client: triton.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(6):
            if i == 3:  # a bad request in the middle fails alone
                client.async_stream_infer(
                    "tiny", [_input(np.zeros((1, 1, 1, 3), np.uint8))], request_id="bad"
                )
            else:
                client.async_stream_infer("tiny", [_input(_images(1, seed=i))], request_id=str(i))
        got = [answers.get(timeout=10) for _ in range(6)]
    finally:
        client.stop_stream()
    ids = [r.get_response().id if r is not None else None for r, _ in got]
    assert ids == ["0", "1", "2", None, "4", "5"]
    error = got[3][1]
    assert isinstance(error, InferenceServerException) and "INVALID_ARGUMENT" in str(error)
    assert got[0][0].as_numpy("probabilities").shape == (1, len(TINY_LABELS))


def test_repository_index_load_and_unload(model_repo: Path) -> None:
    running = ServerThread(model_repo, model_control="explicit")
    client = triton.InferenceServerClient(url=running.target)
    try:
        assert client.get_model_repository_index().models[0].state == "READY"
        client.unload_model("tiny")
        assert not client.is_model_ready("tiny")
        [entry] = client.get_model_repository_index().models
        assert (entry.name, entry.version, entry.state) == ("tiny", "1", "UNAVAILABLE")
        assert client.get_model_repository_index(as_json=True) is not None
        client.load_model("tiny")
        assert client.is_model_ready("tiny")
        with pytest.raises(InferenceServerException, match="not a valid model name"):
            client.load_model("../tiny")
    finally:
        client.close()
        running.stop()


async def test_the_aio_client_infers_streams_and_reads_config(server: ServerThread) -> None:
    client = triton_aio.InferenceServerClient(url=server.target)
    try:
        assert await client.is_server_ready()
        config = await client.get_model_config("tiny")
        assert config.config.max_batch_size == 32
        result = await client.infer("tiny", [_input(_images(2))])
        assert result.as_numpy("probabilities").shape == (2, len(TINY_LABELS))

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for i in range(4):
                yield {
                    "model_name": "tiny",
                    "inputs": [_input(_images(1, seed=i))],
                    "request_id": str(i),
                }

        ids = []
        async for answer, error in client.stream_infer(requests()):
            assert error is None
            ids.append(answer.get_response().id)
            if len(ids) == 4:
                break
        assert ids == ["0", "1", "2", "3"]
        stats = await client.get_inference_statistics("tiny")
        assert stats.model_stats[0].inference_count == 2 + 4
    finally:
        await client.close()
