"""Model lifecycle on a real server: version policy, polling, hot swap, unload, names."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.gates import install_gate
from tests.support import TINY_SIZE, ServerThread, build_tiny_classifier
from tlserve.contract.codec import encode_request_inputs
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc

# Polling is driven by the test (poll_once) unless a test says otherwise.
MANUAL_POLL = {"poll_interval": 3600.0}


def _request(version: str = "") -> pb.ModelInferRequest:
    images = np.zeros((1, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    request = pb.ModelInferRequest(model_name="tiny", model_version=version)
    encode_request_inputs(request, {"images": images})
    return request


def _publish(repo: Path, version: int, labels: tuple[str, ...] = ("a", "b", "c", "d")) -> None:
    """Write a version as tlserve's export does: into a dot-directory, then rename."""
    staging = repo / "tiny" / f".tmp-{version}"
    build_tiny_classifier(staging / "model.onnx", labels=labels)
    staging.rename(repo / "tiny" / str(version))


def _stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def _index(stub: pb_grpc.GRPCInferenceServiceStub) -> list[tuple[str, str, str]]:
    models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
    return [(m.name, m.version, m.state) for m in models]


def test_latest_n_serves_several_versions(model_repo: Path) -> None:
    _publish(model_repo, 2)
    _publish(model_repo, 3)
    running = ServerThread(model_repo, version_policy="latest:2", **MANUAL_POLL)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = _stub(channel)
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=5)
            assert list(meta.versions) == ["2", "3"]
            assert stub.ModelInfer(_request("2"), timeout=5).model_version == "2"
            assert stub.ModelInfer(_request(), timeout=5).model_version == "3"  # newest
            assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1")).ready
            assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="2")).ready
            assert _index(stub) == [
                ("tiny", "1", "UNAVAILABLE"),
                ("tiny", "2", "READY"),
                ("tiny", "3", "READY"),
            ]
    finally:
        running.stop()


def test_specific_versions_are_served_even_when_newer_exist(model_repo: Path) -> None:
    _publish(model_repo, 2)
    running = ServerThread(model_repo, version_policy="specific:1", **MANUAL_POLL)
    try:
        with grpc.insecure_channel(running.target) as channel:
            meta = _stub(channel).ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=5)
        assert list(meta.versions) == ["1"]
    finally:
        running.stop()


def test_polling_loads_a_new_version_and_a_new_model_and_unloads_a_removed_one(
    model_repo: Path,
) -> None:
    running = ServerThread(model_repo, poll_interval=0.1)
    try:
        _publish(model_repo, 2)
        build_tiny_classifier(model_repo / "other" / "1" / "model.onnx")
        registry = running.running.core.registry
        deadline = time.monotonic() + 20
        while not (registry.has("other") and registry.get("tiny").version == "2"):
            assert time.monotonic() < deadline, "polling never picked the changes up"
            time.sleep(0.05)
        shutil.rmtree(model_repo / "other")
        while registry.has("other"):
            assert time.monotonic() < deadline, "polling never unloaded the removed model"
            time.sleep(0.05)
        assert registry.names() == ["tiny"] and registry.ready
    finally:
        running.stop()


def test_hot_reload_under_load_loses_nothing(server_manual: ServerThread) -> None:
    repo = server_manual.config.model_repository
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def client_loop() -> None:
        with grpc.insecure_channel(server_manual.target) as channel:
            stub = _stub(channel)
            while not stop.is_set():
                try:
                    outcomes[stub.ModelInfer(_request(), timeout=10).model_version] += 1
                except grpc.RpcError as exc:
                    outcomes[exc.code().name] += 1

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        while outcomes["1"] < 20:
            time.sleep(0.01)
        _publish(repo, 2)
        server_manual.call(server_manual.running.core.registry.poll_once())
        seen = sum(outcomes.values())
        while sum(outcomes.values()) < seen + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert set(outcomes) == {"1", "2"}, outcomes  # no failure of any kind
    with grpc.insecure_channel(server_manual.target) as channel:
        meta = _stub(channel).ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=5)
    assert list(meta.versions) == ["2"]
    page = urllib.request.urlopen(server_manual.metrics_url, timeout=5).read().decode()
    assert 'tlserve_model_loads_total{model="tiny",outcome="ok"} 2.0' in page
    assert 'tlserve_model_loads_total{model="tiny",outcome="unloaded"} 1.0' in page
    assert 'tlserve_model_loaded{model="tiny",provider="CPUExecutionProvider",version="2"}' in page
    assert 'tlserve_model_loaded{model="tiny",provider="CPUExecutionProvider",version="1"}' not in (
        page
    )


def test_a_broken_new_version_leaves_the_old_one_serving(server_manual: ServerThread) -> None:
    broken = server_manual.config.model_repository / "tiny" / "2"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    server_manual.call(server_manual.running.core.registry.poll_once())
    with grpc.insecure_channel(server_manual.target) as channel:
        stub = _stub(channel)
        assert stub.ModelInfer(_request(), timeout=5).model_version == "1"
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
    [v2] = [m for m in models if m.version == "2"]
    assert v2.state == "UNAVAILABLE" and "parsing failed" in v2.reason
    assert str(server_manual.config.model_repository) not in v2.reason


def test_a_broken_version_fixed_in_place_is_loaded_and_no_request_fails_meanwhile(
    server_manual: ServerThread,
) -> None:
    repo = server_manual.config.model_repository
    registry = server_manual.running.core.registry
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def client_loop() -> None:
        with grpc.insecure_channel(server_manual.target) as channel:
            stub = _stub(channel)
            while not stop.is_set():
                try:
                    outcomes[stub.ModelInfer(_request(), timeout=10).model_version] += 1
                except grpc.RpcError as exc:
                    outcomes[exc.code().name] += 1

    def settle(more: int = 10) -> None:
        seen = sum(outcomes.values())
        while sum(outcomes.values()) < seen + more:
            time.sleep(0.01)

    threads = [threading.Thread(target=client_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        settle()
        (repo / "tiny" / "2").mkdir()
        (repo / "tiny" / "2" / "model.onnx").write_bytes(b"not a model")
        server_manual.call(registry.poll_once())
        server_manual.call(registry.poll_once())  # the same broken file: not tried again
        settle()
        assert registry.get("tiny").version == "1"
        # Fixed in place the way a careful operator does it: write beside, rename over.
        build_tiny_classifier(repo / "tiny" / ".fix" / "model.onnx")
        (repo / "tiny" / ".fix" / "model.onnx").replace(repo / "tiny" / "2" / "model.onnx")
        server_manual.call(registry.poll_once())
        assert registry.get("tiny").version == "2"
        settle()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert set(outcomes) == {"1", "2"}, outcomes  # no failure of any kind
    page = urllib.request.urlopen(server_manual.metrics_url, timeout=5).read().decode()
    assert 'tlserve_model_loads_total{model="tiny",outcome="failed"} 1.0' in page
    assert 'tlserve_model_loads_total{model="tiny",outcome="ok"} 2.0' in page
    with grpc.insecure_channel(server_manual.target) as channel:
        assert _index(_stub(channel)) == [("tiny", "1", "UNAVAILABLE"), ("tiny", "2", "READY")]


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(
    model_repo: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tlserve.cli.main", "serve", "--model-repository",
             str(model_repo), "--grpc-port", "0", "--metrics-port", "0",
             "--drain-delay", "2", "--grace", "10"],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"gRPC on (\S+:\d+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        target = found.group(1)
        with grpc.insecure_channel(target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while check(health_pb2.HealthCheckRequest(), timeout=10).status != 1:  # SERVING
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        before: Counter[str] = Counter()
        after: Counter[str] = Counter()
        signalled, not_serving = threading.Event(), threading.Event()

        def client_loop() -> None:
            # As a caller behind a load balancer: it stops sending once the
            # server reports NOT_SERVING (the drain delay is for that).
            with grpc.insecure_channel(target) as channel:
                stub = _stub(channel)
                while not not_serving.is_set():
                    seen = after if signalled.is_set() else before
                    try:
                        stub.ModelInfer(_request(), timeout=10)
                        seen["OK"] += 1
                    except grpc.RpcError as exc:
                        seen[exc.code().name] += 1
                        if exc.code() == grpc.StatusCode.UNAVAILABLE:
                            return  # the server is gone (and the test fails below)

        def watch_health() -> None:
            try:
                with grpc.insecure_channel(target) as channel:
                    check = health_pb2_grpc.HealthStub(channel).Check
                    while check(health_pb2.HealthCheckRequest(), timeout=10).status == 1:
                        time.sleep(0.01)
            except grpc.RpcError:
                pass  # gone before NOT_SERVING was seen: the clients' counts say so
            finally:
                not_serving.set()

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        while before["OK"] < 50:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.01)
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        signalled.set()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        for thread in [watcher, *threads]:
            thread.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    # Every call made before the drain was announced (those in flight at the
    # signal among them) and every call made while it was being announced
    # answered. The watcher can see NOT_SERVING before any caller sends again,
    # so there may be no calls of the second kind.
    assert set(before) == {"OK"}, before
    assert set(after) <= {"OK"}, after
    assert "stopped" in log.read_text()


@pytest.fixture
def server_manual(model_repo: Path) -> ServerThread:
    running = ServerThread(model_repo, **MANUAL_POLL)
    yield running  # type: ignore[misc]
    running.stop()


@pytest.fixture
def explicit(model_repo: Path) -> ServerThread:
    running = ServerThread(model_repo, model_control="explicit")
    yield running  # type: ignore[misc]
    running.stop()


def test_unload_waits_for_in_flight_requests(explicit: ServerThread) -> None:
    gate = install_gate(explicit.running)
    with grpc.insecure_channel(explicit.target) as channel:
        stub = _stub(channel)
        in_flight = stub.ModelInfer.future(_request(), timeout=30)
        gate.wait_entered(1)
        unload = stub.RepositoryModelUnload.future(
            pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=30
        )
        registry = explicit.running.core.registry
        while registry.has("tiny"):  # unloading: no new requests ...
            time.sleep(0.005)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=5).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_request(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(0.2)
        assert not unload.done()  # ... but the one in flight is waited for
        gate.open()
        assert in_flight.result(timeout=10).model_version == "1"
        unload.result(timeout=10)
        assert _index(stub) == [("tiny", "1", "UNAVAILABLE")]
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
        assert stub.ModelInfer(_request(), timeout=5).model_version == "1"
        assert _index(stub) == [("tiny", "1", "READY")]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "..", "a\\b", "x" * 200])
def test_repository_rpcs_refuse_path_tricks(explicit: ServerThread, name: str) -> None:
    with grpc.insecure_channel(explicit.target) as channel:
        stub = _stub(channel)
        for call, message in (
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name)),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(message, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid model name" in caught.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=5).ready


def test_repository_rpcs_name_what_is_wrong(server_manual: ServerThread) -> None:
    with grpc.insecure_channel(server_manual.target) as channel:
        stub = _stub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "TLSERVE_MODEL_CONTROL=explicit" in caught.value.details()
        # Under polling, load means "rescan this model now".
        _publish(server_manual.config.model_repository, 2)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
        assert stub.ModelInfer(_request(), timeout=5).model_version == "2"
