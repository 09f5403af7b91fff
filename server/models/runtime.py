"""onnxruntime sessions: providers chosen by config, reported, never silent.

:class:`OnnxModel` wraps one loaded ``model.onnx``: its tensors as the
protocol describes them, its model card if it has one, and ``run``.

Providers (``TLSERVE_DEVICE``): ``cpu``; ``cuda`` (CUDA, with I/O binding so
each batch's uint8 input is copied to the GPU once and the cast and
normalisation run there); ``tensorrt`` (TensorRT, then CUDA, then CPU for
what TensorRT cannot run); ``auto`` (CUDA when this onnxruntime has it, else
CPU). The provider actually in use is read back from the session. When a GPU
provider was asked for and is not usable, ``TLSERVE_GPU_FALLBACK`` decides:
``fail`` (the load fails, so the server is not ready, with the reason) or
``cpu`` (serve on CPU, logged at WARNING, counted in
``tlserve_provider_fallbacks_total`` and visible as the model's provider).

TensorRT builds an engine per model (and per range of input shapes) on first
use, which takes seconds to minutes; with ``TLSERVE_TRT_CACHE_DIR`` set the
engines and timing caches are kept there, so a restart loads them instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from tlserve.contract.card import ModelCard
from tlserve.contract.codec import dtype_of
from tlserve.contract.errors import ProviderError
from tlserve.contract.rules import CPU_PROVIDER, CUDA_PROVIDER, GPU_PROVIDERS, TENSORRT_PROVIDER

if TYPE_CHECKING:
    from tlserve.server.config import ServerConfig
    from tlserve.server.metrics import ServerMetrics

__all__ = [
    "OnnxModel",
    "ProviderError",
    "TensorSpec",
    "load_model",
    "provider_options",
    "providers_for",
]

log = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER

# onnxruntime's type strings -> Open Inference Protocol datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, V2 datatype, shape with -1 for free dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def providers_for(device: str, available: list[str] | None = None) -> list[str]:
    """The provider list to ask onnxruntime for, most preferred first.

    ProviderError when ``device`` names a GPU provider this onnxruntime lacks.
    """
    available = ort.get_available_providers() if available is None else available
    if device == "cpu":
        return [CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    wanted = [TENSORRT, CUDA, CPU] if device == "tensorrt" else [CUDA, CPU]
    if wanted[0] not in available:
        raise ProviderError(
            f"TLSERVE_DEVICE={device} but this onnxruntime has no {wanted[0]} "
            f"(available: {', '.join(available)}); install tlserve[serve-gpu] on a machine "
            "with a GPU, or set TLSERVE_GPU_FALLBACK=cpu to serve on CPU instead"
        )
    return [p for p in wanted if p in available]


def provider_options(
    providers: Sequence[str], trt_cache_dir: str = ""
) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` with their options, as ``InferenceSession(providers=...)`` takes them.

    TensorRT gets its engine and timing caches in ``trt_cache_dir`` (made if
    missing) when one is given; other providers keep onnxruntime's defaults.
    """
    result: list[str | tuple[str, dict[str, str]]] = []
    for provider in providers:
        if provider == TENSORRT and trt_cache_dir:
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
            result.append(
                (provider, {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": trt_cache_dir,
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": trt_cache_dir,
                })
            )  # fmt: skip
        else:
            result.append(provider)
    return result


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which tlserve cannot serve")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel:
    """One ONNX model file loaded into an onnxruntime session.

    ``provider`` is the provider in use; ``fallback`` says why it is not the
    one asked for (empty when it is).
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str = "auto",
        gpu_fallback: str = "fail",
        intra_op_threads: int = 0,
        trt_cache_dir: str = "",
    ) -> None:
        self.path = path
        self.requested = device
        self.fallback = ""
        try:
            providers = providers_for(device)
        except ProviderError as exc:
            if gpu_fallback != "cpu":
                raise
            self.fallback = str(exc)
            providers = [CPU]
        if TENSORRT in providers and not trt_cache_dir:
            log.warning(
                "%s: TensorRT engines are rebuilt on every load; set TLSERVE_TRT_CACHE_DIR "
                "to a persistent directory to keep them",
                path,
            )
        self.intra_op_threads = intra_op_threads
        self.session = ort.InferenceSession(
            str(path),
            _session_options(intra_op_threads),
            providers=provider_options(providers, trt_cache_dir),
        )
        self.provider: str = self.session.get_providers()[0]
        if providers[0] != self.provider and not self.fallback:
            # onnxruntime drops a provider it cannot initialise (no driver,
            # missing CUDA/cuDNN libraries) and only logs it: catch that here.
            reason = (
                f"{path}: asked for {providers[0]} but onnxruntime gave {self.provider} "
                "(is the GPU visible and are the CUDA/cuDNN libraries installed?)"
            )
            if device != "auto" and gpu_fallback != "cpu":
                raise ProviderError(reason)
            self.fallback = reason
        if self.fallback:
            log.warning("GPU FALLBACK: %s; serving %s on %s", self.fallback, path, self.provider)
        self.inputs = tuple(_spec(arg) for arg in self.session.get_inputs())
        self.outputs = tuple(_spec(arg) for arg in self.session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]
        props = self.session.get_modelmeta().custom_metadata_map
        self.card: ModelCard | None = ModelCard.from_props(props)
        # Batchable: every input's first dimension is free.
        self.batchable = all(spec.shape and spec.shape[0] == -1 for spec in self.inputs)
        self.io_binding = self.provider in GPU_PROVIDERS

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; returns every output by name."""
        if self.io_binding:
            return self._run_bound(feeds)
        results = self.session.run(self._output_names, feeds)
        return {
            name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)
        }

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """GPU run: inputs copied to the device once, outputs straight back to host."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
            binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        return {
            name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)
        }

    def dummy_inputs(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros shaped like the model's inputs (free dims as 1): for warm-up."""
        feeds = {}
        for spec in self.inputs:
            shape = [max(dim, 1) for dim in spec.shape]
            if self.batchable:
                shape[0] = batch
            feeds[spec.name] = np.zeros(shape, dtype=dtype_of(spec.datatype))
        return feeds


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # onnxruntime's pool threads spin briefly after each run. Turning that off
    # was measured slower here (2 cores, lite0, make bench-serve): p50 at
    # concurrency 1 went from 6.2 to 8.2 ms and peak throughput from 173 to
    # 153 images/s, so the default stays.
    return options


def load_model(
    path: Path,
    config: ServerConfig,
    metrics: ServerMetrics | None = None,
    *,
    intra_op_threads: int | None = None,
) -> OnnxModel:
    """Load ``path`` with the config's provider policy; count a fallback in ``metrics``.

    ``intra_op_threads`` overrides the config's (load-time tuning tries several).
    """
    model = OnnxModel(
        path,
        device=config.device,
        gpu_fallback=config.gpu_fallback,
        intra_op_threads=config.intra_op_threads if intra_op_threads is None else intra_op_threads,
        trt_cache_dir=config.trt_cache_dir,
    )
    if model.fallback and metrics is not None:
        name = path.parent.parent.name
        metrics.provider_fallbacks.labels(name, config.device, model.provider).inc()
    return model
