"""Execution providers and the GPU fallback policy.

The policy is exercised on this CPU-only onnxruntime through the same code a
GPU machine runs: asking for CUDA here is exactly "the GPU is not usable".
Tests marked ``gpu`` run only where onnxruntime has CUDA (bench/gpu_check.sh).
"""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from tests.support import TINY_SIZE, ServerThread
from tlserve.client import Client
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.server.models import runtime
from tlserve.server.models.gpu import register_gpu_metrics
from tlserve.server.models.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxModel,
    ProviderError,
    providers_for,
)

HAS_CUDA = CUDA in ort.get_available_providers()


def test_provider_lists_follow_the_device() -> None:
    every = [TENSORRT, CUDA, CPU]
    assert providers_for("cpu", every) == [CPU]
    assert providers_for("auto", every) == [CUDA, CPU]
    assert providers_for("cuda", every) == [CUDA, CPU]
    assert providers_for("tensorrt", every) == [TENSORRT, CUDA, CPU]
    assert providers_for("auto", [CPU]) == [CPU]
    for device in ("cuda", "tensorrt"):
        with pytest.raises(ProviderError, match="TLSERVE_GPU_FALLBACK=cpu"):
            providers_for(device, [CPU])


@pytest.mark.skipif(HAS_CUDA, reason="needs an onnxruntime without CUDA")
def test_cuda_with_fail_policy_leaves_the_server_not_ready(model_repo: Path) -> None:
    running = ServerThread(model_repo, device="cuda", gpu_fallback="fail")
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=5).ready
        reason = running.running.core.registry.failed["tiny"]
        assert "no CUDAExecutionProvider" in reason
    finally:
        running.stop()


@pytest.mark.skipif(HAS_CUDA, reason="needs an onnxruntime without CUDA")
def test_cuda_with_cpu_policy_serves_on_cpu_loudly(
    model_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tlserve.server.models.runtime")
    running = ServerThread(model_repo, device="cuda", gpu_fallback="cpu")
    try:
        with Client(running.target) as client:
            assert client.server_ready(timeout=5)
            assert client.model_metadata("tiny", timeout=5).execution_provider == CPU
            images = np.zeros((2, TINY_SIZE, TINY_SIZE, 3), np.uint8)
            outputs = client.infer("tiny", {"images": images}, timeout=5)
            assert outputs["probabilities"].shape[0] == 2
        scrape = urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()
    finally:
        running.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("GPU FALLBACK" in message for message in warnings)
    assert (
        'tlserve_provider_fallbacks_total{model="tiny",provider="CPUExecutionProvider",'
        'requested="cuda"} 1.0' in scrape
    )
    assert (
        'tlserve_model_loaded{model="tiny",provider="CPUExecutionProvider",version="1"}' in scrape
    )


@pytest.mark.skipif(HAS_CUDA, reason="needs an onnxruntime without CUDA")
def test_a_provider_onnxruntime_drops_is_caught(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime only warns when it cannot use a provider it was given; we refuse."""
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])
    path = model_repo / "tiny" / "1" / "model.onnx"
    with pytest.warns(UserWarning), pytest.raises(ProviderError, match="onnxruntime gave CPU"):
        OnnxModel(path, device="cuda", gpu_fallback="fail")
    with pytest.warns(UserWarning):
        model = OnnxModel(path, device="auto")
    assert model.provider == CPU and "onnxruntime gave" in model.fallback
    assert not model.io_binding


def test_cpu_model_runs_without_io_binding(model_repo: Path) -> None:
    model = OnnxModel(model_repo / "tiny" / "1" / "model.onnx", device="cpu")
    assert model.provider == CPU and not model.io_binding and not model.fallback
    outputs = model.run(model.dummy_inputs(batch=3))
    assert outputs["probabilities"].shape == (3, 3)


def test_gpu_metrics_are_off_cleanly_without_nvml_or_on_cpu() -> None:
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, "cpu") is None
    collector = register_gpu_metrics(registry, "auto")
    if collector is None:  # no pynvml, no driver or no GPU here
        assert not [m for m in registry.collect() if m.name.startswith("tlserve_gpu")]


@pytest.mark.gpu
def test_cuda_serving_with_io_binding_matches_cpu(model_repo: Path) -> None:
    path = model_repo / "tiny" / "1" / "model.onnx"
    on_gpu = OnnxModel(path, device="cuda", gpu_fallback="fail")
    assert on_gpu.provider == CUDA and on_gpu.io_binding
    on_cpu = OnnxModel(path, device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (16, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    got, want = on_gpu.run({"images": images}), on_cpu.run({"images": images})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    running = ServerThread(model_repo, device="cuda", gpu_fallback="fail")
    try:
        with Client(running.target) as client:
            assert client.model_metadata("tiny", timeout=5).execution_provider == CUDA
            out = client.infer("tiny", {"images": images}, timeout=10)
        np.testing.assert_allclose(out["probabilities"], want["probabilities"], rtol=1e-4)
    finally:
        running.stop()


@pytest.mark.gpu
def test_nvml_gpu_metrics_are_exported() -> None:
    pytest.importorskip("pynvml")
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, "cuda") is not None
    names = {s.name for m in registry.collect() for s in m.samples}
    assert {"tlserve_gpu_memory_used_bytes", "tlserve_gpu_utilization_ratio"} <= names
    total = registry.get_sample_value("tlserve_gpu_memory_total_bytes", {"gpu": "0"})
    assert total is not None and total > 1e9
