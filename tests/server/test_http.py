"""The KServe v2 REST edge through a real server: every endpoint as the protocol
says, the same numbers as gRPC for the same input, errors as HTTP status codes
with gRPC's messages, and the same bound, token, deadlines and metrics."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.gates import install_gate
from tests.server.http_calls import (
    Answer,
    binary_outputs,
    build_http_repository,
    call,
    infer_binary,
    infer_json,
)
from tests.support import ServerThread, free_port, png_bytes
from tlserve.client import Client
from tlserve.contract.errors import InvalidInput, Overloaded
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc

RED, GREY = (230, 20, 20), (128, 128, 128)
IMAGES = np.stack([np.full((8, 8, 3), c, np.uint8) for c in (RED, GREY, (10, 200, 30))])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("http") / "models"
    build_http_repository(repo)
    running = ServerThread(repo, http_port=free_port())
    yield running
    running.stop()


def test_health_and_metadata_answer_as_the_protocol_says(server: ServerThread) -> None:
    port = server.running.http_port
    assert call(port, "GET", "/v2/health/live").json() == {"live": True}
    assert call(port, "GET", "/v2/health/ready").json() == {"ready": True}
    meta = call(port, "GET", "/v2").json()
    assert meta["name"] == "tlserve" and "model_repository" in meta["extensions"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        expected = stub.ModelMetadata(pb.ModelMetadataRequest(name="watched"), timeout=10)
    for path in ("/v2/models/watched", "/v2/models/watched/versions/1"):
        model = call(port, "GET", path).json()
        assert model["name"] == "watched" and model["versions"] == ["1"]
        assert model["platform"] == expected.platform
        assert model["inputs"] == [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            for t in expected.inputs
        ]
        assert [t["name"] for t in model["outputs"]] == [t.name for t in expected.outputs]
        assert model["parameters"]["execution_provider"] == "CPUExecutionProvider"
        assert json.loads(model["parameters"]["tlserve.labels"]) == ["red", "green", "blue"]
    for path in ("/v2/models/watched/ready", "/v2/models/watched/versions/1/ready"):
        answer = call(port, "GET", path)
        assert answer.status == 200 and answer.json() == {"name": "watched", "ready": True}


def test_json_and_binary_infer_give_grpcs_numbers(server: ServerThread) -> None:
    port = server.running.http_port
    with Client(server.target) as client:
        expected = client.infer("watched", {"images": IMAGES})
    answer = call(port, "POST", "/v2/models/watched/infer", infer_json(IMAGES, id="call-7"))
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    document = answer.json()
    assert (document["model_name"], document["model_version"], document["id"]) == (
        "watched", "1", "call-7",
    )  # fmt: skip
    got = {
        t["name"]: np.array(t["data"], np.float32).reshape(t["shape"]) for t in document["outputs"]
    }
    assert {t["datatype"] for t in document["outputs"]} == {"FP32"}
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)  # exactly: float32 survives JSON

    body, headers = infer_binary(IMAGES)  # binary in, every output binary
    answer = call(port, "POST", "/v2/models/watched/versions/1/infer", body, headers)
    assert answer.status == 200 and answer.headers["content-type"] == "application/octet-stream"
    got = binary_outputs(answer)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)

    body, headers = infer_binary(IMAGES, outputs=["ood_score"])  # only the output asked for
    got = binary_outputs(call(port, "POST", "/v2/models/watched/infer", body, headers))
    assert list(got) == ["ood_score"]
    np.testing.assert_array_equal(got["ood_score"], expected["ood_score"])


def test_classify_gives_grpcs_labels_scores_and_ood_score(server: ServerThread) -> None:
    port = server.running.http_port
    images = [png_bytes(RED), png_bytes(GREY)]
    with Client(server.target) as client:
        expected = client.classify(images, model="watched", top_k=2)

    def rows(answer: Answer) -> list[tuple[list[tuple[str, int, float]], float, bool]]:
        assert answer.status == 200, answer.body
        return [
            ([(p["label"], p["index"], p["score"]) for p in r["labels"]], r["ood_score"],
             r["out_of_distribution"])
            for r in answer.json()["results"]
        ]  # fmt: skip

    want = [
        ([(p.label, p.index, p.score) for p in c], c.ood_score, c.out_of_distribution)
        for c in expected
    ]
    assert want[0][2] is False and want[1][2] is True  # red is in, grey is out
    boundary = uuid.uuid4().hex
    multipart = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n"
            for i, image in enumerate(images)
        )
        + f"--{boundary}--\r\n".encode()
    )
    answer = call(
        port, "POST", "/v2/models/watched/classify?top_k=2", multipart,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert rows(answer) == want
    for image in images:  # one raw image as the body (a batch of one, as over gRPC)
        with Client(server.target) as client:
            [alone] = client.classify([image], model="watched", top_k=2)
        answer = call(
            port, "POST", "/v2/models/watched/versions/1/classify?top_k=2", image,
            {"Content-Type": "image/png"},
        )  # fmt: skip
        assert rows(answer) == [
            ([(p.label, p.index, p.score) for p in alone], alone.ood_score,
             alone.out_of_distribution)
        ]  # fmt: skip
    # A model without the score answers null, and top-k defaults as over gRPC.
    answer = call(
        port, "POST", "/v2/models/tiny/classify", images[0], {"Content-Type": "image/png"}
    )
    [result] = answer.json()["results"]
    assert result["ood_score"] is None and result["labels"][0]["label"] == "red"


def test_errors_are_http_codes_with_grpcs_messages(server: ServerThread) -> None:
    port = server.running.http_port
    wrong = np.zeros((1, 4, 4, 3), np.uint8)
    with Client(server.target) as client, pytest.raises(InvalidInput) as grpc_error:
        client.infer("tiny", {"images": wrong})
    answer = call(port, "POST", "/v2/models/tiny/infer", infer_json(wrong))
    assert answer.status == 400
    assert f"INVALID_ARGUMENT: {answer.json()['error']}" == str(grpc_error.value)
    for method, path in (
        ("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"),
        ("GET", "/v2/models/tiny/versions/9"), ("POST", "/v2/models/nope/infer"),
        ("POST", "/v2/models/nope/classify"), ("GET", "/v3/anything"),
    ):  # fmt: skip
        answer = call(port, method, path, b"{}" if method == "POST" else None)
        assert answer.status == 404, (path, answer.body)
        assert answer.json()["error"]
    assert "no model named 'nope'" in call(port, "GET", "/v2/models/nope").json()["error"]
    assert call(port, "GET", "/v2/models/tiny/infer").status == 405
    answer = call(port, "POST", "/v2/models/tiny/classify", b"not an image",
                  {"Content-Type": "image/png"})  # fmt: skip
    assert answer.status == 400 and "image 0" in answer.json()["error"]
    answer = call(port, "POST", "/v2/models/tiny/classify", b"x", {"Content-Type": "text/plain"})
    assert answer.status == 400 and "multipart/form-data" in answer.json()["error"]


def test_inference_calls_are_counted_with_their_api(server: ServerThread) -> None:
    port = server.running.http_port
    call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES[:1]))
    call(port, "POST", "/v2/models/tiny/infer", b"[")
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    counts = {
        (s.labels["api"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tlserve_requests_total" and s.labels["model"] == "tiny"
    }
    assert counts[("RestModelInfer", "OK")] >= 1
    assert counts[("RestModelInfer", "INVALID_ARGUMENT")] >= 1


@pytest.fixture
def bounded(tmp_path: Path) -> Iterator[ServerThread]:
    build_http_repository(tmp_path / "models")
    running = ServerThread(tmp_path / "models", http_port=free_port(), max_concurrent_rpcs=1)
    yield running
    running.stop()


def test_one_bound_for_both_edges_429_retry_after_and_504(bounded: ServerThread) -> None:
    port = bounded.running.http_port
    gate = install_gate(bounded.running)
    held: list[Answer] = []
    first = threading.Thread(
        target=lambda: held.append(call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES)))
    )
    first.start()
    gate.wait_entered(1)
    answer = call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES))
    assert answer.status == 429 and int(answer.headers["retry-after"]) >= 1
    assert int(answer.headers["retry-after-ms"]) >= 1  # the same hint as gRPC's trailer
    assert "inference calls, its limit" in answer.json()["error"]
    with Client(bounded.target) as client, pytest.raises(Overloaded) as refused:
        client.infer("tiny", {"images": IMAGES}, timeout=10)  # gRPC shares the bound
    assert answer.json()["error"] in str(refused.value)
    gate.open()
    first.join(timeout=30)
    assert held[0].status == 200
    text = urllib.request.urlopen(bounded.metrics_url, timeout=5).read().decode()
    refusals = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tlserve_requests_total" and s.labels["outcome"] == "RESOURCE_EXHAUSTED"
        and s.labels["api"] == "RestModelInfer"
    ]  # fmt: skip
    assert refusals == [1.0]  # counted once, by the admission, as gRPC's refusals are

    gate = install_gate(bounded.running)  # a deadline that passes while the batch runs
    answer = call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES), {"Timeout": "0.3"})
    assert answer.status == 504 and "deadline" in answer.json()["error"]
    gate.open()
    answer = call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES), {"Timeout": "x"})
    assert answer.status == 400 and "Timeout" in answer.json()["error"]


def test_503_while_draining_then_closing(bounded: ServerThread) -> None:
    port = bounded.running.http_port
    bounded.running.core.drain()
    assert call(port, "GET", "/v2/health/ready").status == 503
    assert call(port, "GET", "/v2/models/tiny/ready").status == 503
    assert call(port, "GET", "/v2/health/live").status == 200
    # Still answered while load balancers notice, as over gRPC...
    assert call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES)).status == 200
    bounded.running.admission.close()  # ...until the stop begins
    answer = call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES))
    assert answer.status == 503 and "shutting down" in answer.json()["error"]
    bounded.running.admission.release()


def test_the_http_port_setting(tmp_path: Path) -> None:
    from tlserve.server.config import ConfigError, ServerConfig

    repo = {"TLSERVE_MODEL_REPOSITORY": str(tmp_path)}
    assert ServerConfig.load(environ=repo).http_port == 8000  # Triton's
    assert ServerConfig.load(environ={**repo, "TLSERVE_HTTP_PORT": "0"}).http_port == 0
    assert ServerConfig.load({"http_port": 9000}, environ=repo).http_port == 9000
    with pytest.raises(ConfigError, match="TLSERVE_HTTP_PORT"):
        ServerConfig.load({"http_port": 70000}, environ=repo)


def test_a_call_no_model_can_answer_in_time_gets_504_and_the_time_it_had(
    tmp_path: Path,
) -> None:
    build_http_repository(tmp_path / "models")
    running = ServerThread(tmp_path / "models", http_port=free_port())
    try:
        port = running.running.http_port
        gate = install_gate(running.running)
        held: list[Answer] = []
        busy = threading.Thread(
            target=lambda: held.append(
                call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES))
            )
        )
        busy.start()
        gate.wait_entered(1)
        running.running.core.registry.get("tiny").batcher.speed.measured(1, 1000.0)
        answer = call(port, "POST", "/v2/models/tiny/infer", infer_json(IMAGES), {"Timeout": "5"})
        assert answer.status == 504 and "work ahead" in answer.json()["error"]
        # As gRPC's trailer: what the deadline still had, so the caller sees its own wait.
        assert 2500 < int(answer.headers["deadline-left-ms"]) <= 5100
        gate.open()
        busy.join(timeout=30)
        assert held[0].status == 200
    finally:
        running.stop()
