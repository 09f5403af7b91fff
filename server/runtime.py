"""onnxruntime sessions: providers chosen by config, reported, never silent.

:class:`OnnxModel` wraps one loaded ``model.onnx``: its tensors as the
protocol describes them, its model card if it has one, and ``run``. The
execution provider actually in use is read back from the session, so a GPU
that was asked for and not obtained is an error (``device="cuda"``) or a
logged fallback (``device="auto"``), never a silent one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tlserve.client.codec import dtype_of
from tlserve.client.metadata import ModelCard

__all__ = ["OnnxModel", "ProviderError", "TensorSpec", "providers_for"]

log = logging.getLogger(__name__)

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


class ProviderError(RuntimeError):
    """The execution provider that the configuration demands is not usable."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, V2 datatype, shape with -1 for free dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def providers_for(device: str) -> list[str]:
    """The provider list to ask onnxruntime for, most preferred first."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ProviderError(
            "TLSERVE_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install tlserve[serve-gpu] or use device=auto"
        )
    return ["CPUExecutionProvider"]


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which tlserve cannot serve")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel:
    """One ONNX model file loaded into an onnxruntime session."""

    def __init__(self, path: Path, *, device: str = "auto", intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        requested = providers_for(device)
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=requested)
        active = self.session.get_providers()
        self.provider: str = active[0]
        if requested[0] != self.provider:
            if device == "cuda":
                raise ProviderError(
                    f"{path}: asked for {requested[0]} but onnxruntime gave {self.provider} "
                    "(is the GPU visible and are CUDA/cuDNN libraries installed?)"
                )
            log.warning(
                "%s: %s was not usable, falling back to %s", path, requested[0], self.provider
            )
        self.inputs = tuple(_spec(arg) for arg in self.session.get_inputs())
        self.outputs = tuple(_spec(arg) for arg in self.session.get_outputs())
        props = self.session.get_modelmeta().custom_metadata_map
        self.card: ModelCard | None = ModelCard.from_props(props)
        # Batchable: every input's first dimension is free.
        self.batchable = all(spec.shape and spec.shape[0] == -1 for spec in self.inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; returns every output by name."""
        names = [spec.name for spec in self.outputs]
        results = self.session.run(names, feeds)
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}

    def dummy_inputs(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros shaped like the model's inputs (free dims as 1): for warm-up."""
        feeds = {}
        for spec in self.inputs:
            shape = [max(dim, 1) for dim in spec.shape]
            if self.batchable:
                shape[0] = batch
            feeds[spec.name] = np.zeros(shape, dtype=dtype_of(spec.datatype))
        return feeds
