"""Load-time tuning: measured on the real model, bounded in time, explicit settings win."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.support import ServerThread
from tlserve.client import Client
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.server.config import ServerConfig
from tlserve.server.models.runtime import OnnxModel, load_model, provider_options
from tlserve.server.models.tuning import Trial, candidate_batches, decide, tune_model, warm_up
from tlserve.server.models.tuning_search import (
    NARROW_MIN_PATHS,
    REQUEST_PATH_SECONDS,
    ROUNDS,
    Layout,
    cores,
    default_layout,
    layouts,
    lone_threads,
    search,
)


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


def test_a_search_cut_by_its_time_bound_keeps_the_default(model_repo: Path) -> None:
    def slow_loader(*args: Any, **kwargs: Any) -> OnnxModel:
        time.sleep(0.02)  # the bound has passed before the search starts
        return load_model(*args, **kwargs)

    config = _config(model_repo, tune="on", tune_seconds=0.01)
    started = time.perf_counter()
    _, tuning, _ = tune_model(_path(model_repo), config, loader=slow_loader)
    elapsed = time.perf_counter() - started
    assert "time bound reached" in tuning.reason and "fit the time bound" in tuning.reason
    # The default layout (a model of microseconds: request-bound): one repeat is no evidence.
    assert (tuning.intra_op_threads, tuning.instances) == (cores(), 1)
    assert elapsed < 2.0  # the bound plus one trial per layout and their session loads


def test_a_batch_of_one_past_the_latency_cap_is_kept_and_said_so(model_repo: Path) -> None:
    config = _config(model_repo, tune="on", tune_seconds=0.5, tune_latency_cap=1e-9)
    _, tuning, _ = tune_model(_path(model_repo), config)
    assert tuning.max_batch_size == 1 and "max batch 1: even that ran past 0 ms" in tuning.reason
    assert {t.batch for t in tuning.trials} == {1}  # larger batches only take longer


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


def test_a_noisy_near_tie_keeps_the_default_and_a_clear_win_replaces_it() -> None:
    default, rival = (2, 1), (1, 2)
    noisy = {default: [100.0, 92.0, 108.0, 99.0, 101.0], rival: [108.0, 97.0, 104.0, 106.0]}
    chosen, why = decide(noisy, default)
    assert chosen == default  # 5% ahead, inside the 16% spread of the default's repeats
    assert why.startswith("2 threads x 1 instance kept: 1x2 measured 5% faster, inside the 16%")
    clear = {default: [100.0, 98.0, 102.0], rival: [130.0, 126.0, 131.0]}
    chosen, why = decide(clear, default)
    assert chosen == rival and why.startswith("1 thread x 2 instances: 30% faster than 2x1")
    steady = {default: [100.0, 100.5, 99.5], rival: [104.0, 104.0, 104.0]}
    assert decide(steady, default)[0] == default  # a 4% win is within the floor
    assert decide({default: [100.0, 100.0], rival: [200.0, 200.0]}, default)[0] == default
    assert decide({default: [100.0]}, default) == (default, "")  # nothing to compare


def test_the_default_layout_follows_whether_compute_or_the_request_path_bounds_the_model() -> None:
    # Hosts of any size, not only this one: the AVX2 and the VNNI hosts alike.
    compute_bound = NARROW_MIN_PATHS * REQUEST_PATH_SECONDS  # a row on one core
    for host in (2, 4, 16):
        assert default_layout(host, 1, host, set(), False, compute_bound) == (1, host)
        assert default_layout(host, 1, host, set(), False, compute_bound / 2) == (host, 1)
    assert default_layout(2, 1, 2, {"instances"}, False, 1.0) == (2, 1)
    assert default_layout(4, 1, 8, {"intra_op_threads"}, False, 1.0) == (4, 1)
    assert default_layout(0, 1, 8, set(), True, 1.0) == (0, 1)


def test_layouts_fill_the_cores_and_keep_what_was_given() -> None:
    assert layouts((2, 1), 2, set(), on_gpu=False) == [(2, 1), (1, 2)]
    assert layouts((8, 1), 8, set(), on_gpu=False) == [(8, 1), (4, 2), (1, 8)]
    assert layouts((1, 1), 2, {"intra_op_threads"}, on_gpu=False) == [(1, 1), (1, 2)]
    assert layouts((2, 1), 2, {"instances"}, on_gpu=False) == [(2, 1)]
    assert layouts((1, 1), 2, {"intra_op_threads", "instances"}, on_gpu=False) == [(1, 1)]
    assert layouts((0, 1), 2, set(), on_gpu=True) == [(0, 1), (0, 2)]


def test_a_lone_session_exists_whenever_the_serving_one_is_narrower_than_the_cores() -> None:
    assert lone_threads(1, 2, threads_fixed=False) == 2
    assert lone_threads(2, 8, threads_fixed=False) == 8
    assert lone_threads(2, 2, threads_fixed=False) == 0  # it already has every core
    assert lone_threads(1, 2, threads_fixed=True) == 0  # threads were given: never another count


def test_layouts_run_interleaved_each_at_its_largest_batch_within_the_cap() -> None:
    row_seconds = {(2, 1): 0.010, (1, 2): 0.020}  # per row: 1x2 reaches the cap sooner
    order: list[tuple[Layout, int, bool]] = []

    def fake(layout: Layout, batch: int, seconds: float, warm: bool) -> Trial:
        order.append((layout, batch, warm))
        return Trial(*layout, batch, 100.0, batch * row_seconds[layout])

    found = search(fake, [(2, 1), (1, 2)], candidate_batches(32), 0.1, time.perf_counter() + 60)
    assert found.batches == {(2, 1): 8, (1, 2): 4}  # 16 x 10 ms and 8 x 20 ms pass 100 ms
    repeats = [(layout, batch) for layout, batch, warm in order if not warm]
    assert len(repeats) == 2 * ROUNDS and not found.cut
    assert [layout for layout, _ in repeats[:4]] == [(2, 1), (1, 2), (1, 2), (2, 1)]
    assert set(repeats) == {((2, 1), 8), ((1, 2), 4)}


def test_a_narrow_choice_comes_back_with_an_all_cores_session_for_lone_batches(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def narrowest(repeats: dict[Layout, list[float]], default: Layout) -> tuple[Layout, str]:
        return min(repeats), "the narrowest, for this test"

    monkeypatch.setattr("tlserve.server.models.tuning.cores", lambda: 2)  # the same on any host
    monkeypatch.setattr("tlserve.server.models.tuning.decide", narrowest)
    config = _config(model_repo, tune="on", tune_seconds=1.0)
    model, tuning, lone = tune_model(_path(model_repo), config)
    assert (tuning.intra_op_threads, tuning.instances) == (1, 2) == (model.intra_op_threads, 2)
    assert lone is not None and lone.intra_op_threads == tuning.lone_threads == 2
    assert "a batch running alone uses 2 threads" in tuning.reason
    assert tuning.sources["intra_op_threads"] == tuning.sources["instances"] == "tuned"


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


@pytest.mark.gpu(provider="TensorrtExecutionProvider")
def test_tensorrt_engine_cache_survives_a_reload(model_repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "trt"
    config = _config(model_repo, device="tensorrt", trt_cache_dir=str(cache), max_batch_size=4)
    model, _, _ = tune_model(_path(model_repo), config)
    assert model.provider == "TensorrtExecutionProvider"
    assert any(cache.iterdir())  # engines written; a restart loads them
    assert load_model(_path(model_repo), config).provider == "TensorrtExecutionProvider"
