"""Load-time tuning: measured on the real model, bounded in time, explicit settings win."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import ServerThread
from tlserve.client import Client
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.server.config import ServerConfig
from tlserve.server.runtime import OnnxModel, load_model, provider_options
from tlserve.server.tuning import Trial, candidate_batches, pick, tune_model, warm_up
from tlserve.server.tuning_search import lone_threads


def _config(repo: Path, **overrides: object) -> ServerConfig:
    return ServerConfig.load({"model_repository": repo, **overrides}, environ={})


def _path(repo: Path) -> Path:
    return repo / "tiny" / "1" / "model.onnx"


def test_explicit_settings_are_measured_at_their_value_never_changed(model_repo: Path) -> None:
    config = _config(model_repo, tune="on", tune_seconds=2.0, intra_op_threads=1, instances=1)
    model, tuning, lone = tune_model(_path(model_repo), config)
    assert tuning.trials and {(t.intra_op_threads, t.instances) for t in tuning.trials} == {(1, 1)}
    assert lone is None and tuning.lone_threads == 0  # threads given: never another count
    assert (tuning.intra_op_threads, tuning.instances) == (1, 1)
    assert tuning.sources == {
        "intra_op_threads": "explicit",
        "instances": "explicit",
        "max_batch_size": "tuned",
    }
    assert {t.batch for t in tuning.trials} == set(candidate_batches(32))
    assert model.intra_op_threads == 1


def test_a_setting_given_through_the_environment_is_explicit_too(model_repo: Path) -> None:
    config = ServerConfig.load(
        {"model_repository": model_repo, "tune": "on", "tune_seconds": 1.0},
        environ={"TLSERVE_MAX_BATCH_SIZE": "8"},
    )
    _, tuning, _ = tune_model(_path(model_repo), config)
    assert tuning.max_batch_size == 8 and tuning.sources["max_batch_size"] == "explicit"
    assert {t.batch for t in tuning.trials} == {8}


def test_tuning_stops_at_its_time_bound(model_repo: Path) -> None:
    config = _config(model_repo, tune="on", tune_seconds=0.2)
    started = time.perf_counter()
    _, tuning, _ = tune_model(_path(model_repo), config)
    elapsed = time.perf_counter() - started
    assert "time bound reached" in tuning.reason
    assert 1 <= len(tuning.trials) < 2 * 2 * len(candidate_batches(32))
    assert elapsed < 2.0  # the bound plus at most one trial and one session load


def test_auto_leaves_a_sub_millisecond_model_alone_and_off_means_off(model_repo: Path) -> None:
    # auto: not searched, but on one intra-op thread (no pool spinning on the
    # request path's cores), unless threads were given; off: nothing changes.
    cases = (
        ("auto", {}, "request path bounds", 1, "tuned"),
        ("auto", {"intra_op_threads": 2}, "request path bounds", 2, "explicit"),
        ("off", {}, "tuning off", 0, "default"),
    )
    for mode, given, why, threads, source in cases:
        model, tuning, _ = tune_model(_path(model_repo), _config(model_repo, tune=mode, **given))
        assert not tuning.trials and why in tuning.reason
        assert tuning.settings() == {
            "intra_op_threads": threads, "instances": 1, "max_batch_size": 32
        }  # fmt: skip
        assert tuning.sources["intra_op_threads"] == source
        assert model.intra_op_threads == threads


def test_pick_takes_the_best_throughput_within_the_latency_cap() -> None:
    trials = [
        Trial(2, 1, 1, 100.0, 0.010),
        Trial(2, 1, 16, 400.0, 0.040),
        Trial(1, 2, 16, 395.0, 0.080),  # over a 50 ms cap
        Trial(2, 1, 32, 500.0, 0.064),  # over a 50 ms cap
        Trial(1, 1, 16, 390.0, 0.041),  # within 3%: one thread, so it wins
    ]
    assert pick(trials, 0.05) == trials[4]
    assert pick(trials, 1.0) == trials[3]
    assert pick(trials, 0.001) == trials[0]  # none within the cap: the fastest batch


def test_a_lone_batch_gets_more_threads_only_when_they_measured_clearly_faster() -> None:
    chosen = Trial(1, 2, 4, 300.0, 0.020)  # throughput: one thread per instance
    trials = [chosen, Trial(1, 1, 1, 90.0, 0.011), Trial(2, 1, 1, 160.0, 0.006)]
    assert lone_threads(trials, chosen) == 2
    slightly = [chosen, Trial(1, 1, 1, 90.0, 0.011), Trial(2, 1, 1, 95.0, 0.0100)]
    assert lone_threads(slightly, chosen) == 0  # within the noise: one session
    single = Trial(1, 1, 4, 300.0, 0.020)  # one instance: every batch is alone
    assert lone_threads([single, *trials[1:]], single) == 0


def test_a_lone_session_comes_back_with_the_thread_count_it_was_measured_at(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def another_count(trials: list[Trial], chosen: Trial) -> int:
        return next(
            t.intra_op_threads for t in trials if t.intra_op_threads != chosen.intra_op_threads
        )

    monkeypatch.setattr("tlserve.server.tuning.lone_threads", another_count)
    config = _config(model_repo, tune="on", tune_seconds=1.0)
    model, tuning, lone = tune_model(_path(model_repo), config)
    assert lone is not None and lone is not model
    assert tuning.lone_threads == lone.intra_op_threads != model.intra_op_threads
    assert f"a batch running alone uses {tuning.lone_threads} threads" in tuning.reason


def test_the_server_serves_with_the_tuned_choice_and_shows_it(model_repo: Path) -> None:
    running = ServerThread(model_repo, tune="on", tune_seconds=1.0, instances=1)
    try:
        with Client(running.target) as client:
            outputs = client.infer("tiny", {"images": np.zeros((3, 8, 8, 3), np.uint8)})
            assert outputs["probabilities"].shape == (3, 3)
        loaded = running.running.core.registry.get("tiny")
        tuning = loaded.tuning
        assert tuning is not None and tuning.sources["instances"] == "explicit"
        assert loaded.batcher.max_batch_size == tuning.max_batch_size
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=5).config
        assert config.max_batch_size == tuning.max_batch_size
        assert config.instance_group[0].count == 1
        parameters = {k: v.string_value for k, v in config.parameters.items()}
        assert parameters["intra_op_threads"] == str(tuning.intra_op_threads)
        assert parameters["max_batch_size_source"] == "tuned"
        assert parameters["instances_source"] == "explicit"
        assert parameters["variant"] == "float32"
        assert "lone_batch_threads" not in parameters  # one instance: every batch is alone
        loaded.tuning = dataclasses.replace(tuning, lone_threads=2)
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=5).config
        assert config.parameters["lone_batch_threads"].string_value == "2"
        page = urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()
        line = (
            f'tlserve_model_setting{{model="tiny",setting="max_batch_size",source="tuned",'
            f'version="1"}} {float(tuning.max_batch_size)}'
        )
        assert line in page
    finally:
        running.stop()


class _Recording(OnnxModel):
    """The real model, remembering the batch sizes it ran."""

    sizes: list[int]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sizes.append(len(next(iter(feeds.values()))))
        return super().run(feeds)


def test_gpu_warm_up_covers_every_batch_size_smallest_and_largest_first(model_repo: Path) -> None:
    model = _Recording(_path(model_repo), device="cpu")
    model.sizes = []
    warm_up(model, list(range(1, 9)))
    assert model.sizes[:2] == [1, 8] and sorted(model.sizes) == list(range(1, 9))


def test_tensorrt_keeps_its_engines_in_the_configured_directory(tmp_path: Path) -> None:
    cache = tmp_path / "trt"
    options = provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], str(cache)
    )
    trt, cuda, cpu = options
    assert isinstance(trt, tuple) and trt[1]["trt_engine_cache_path"] == str(cache)
    assert trt[1]["trt_engine_cache_enable"] == "True" and cache.is_dir()
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert provider_options(["TensorrtExecutionProvider"]) == ["TensorrtExecutionProvider"]


@pytest.mark.gpu
def test_tensorrt_engine_cache_survives_a_reload(model_repo: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no TensorrtExecutionProvider here")
    cache = tmp_path / "trt"
    config = _config(model_repo, device="tensorrt", trt_cache_dir=str(cache), max_batch_size=4)
    model, _, _ = tune_model(_path(model_repo), config)
    assert model.provider == "TensorrtExecutionProvider"
    assert any(cache.iterdir())  # engines written; a restart loads them
    assert load_model(_path(model_repo), config).provider == "TensorrtExecutionProvider"
