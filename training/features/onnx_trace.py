"""Tracing a torch module to ONNX, and how closely onnxruntime must then match torch.

Shared by the model export (:mod:`~tlserve.training.artifact.export`) and the fast
feature path (:mod:`~tlserve.training.features.onnx_features`), so both trace the
same way and hold their graphs to the same tolerances. It imports neither:
the export depends on feature extraction (through the OOD fit), and feature
extraction on this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import torch

from tlserve.contract.errors import ExportError
from tlserve.contract.rules import INPUT_IMAGES

__all__ = [
    "BATCH_AXIS",
    "EMBEDDING_ATOL",
    "EMBEDDING_RTOL",
    "OPSET",
    "PROBABILITY_ATOL",
    "embedding_excess",
    "trace_to_onnx",
]

OPSET = 18
BATCH_AXIS = "batch"

# Tolerances between onnxruntime (CPU) and PyTorch on the same uint8 images.
# Observed differences are ~1e-7 for probabilities and ~1e-5 for embeddings
# (different convolution kernels); the bounds leave room for other CPUs.
PROBABILITY_ATOL = 1e-4
EMBEDDING_RTOL = 1e-3
EMBEDDING_ATOL = 1e-4


def embedding_excess(onnx_embeddings: np.ndarray, torch_embeddings: np.ndarray) -> float:
    """How far past the tolerance the worst element is: at most 0 when within it (NaN if any is)."""
    allowed = EMBEDDING_ATOL + EMBEDDING_RTOL * np.abs(torch_embeddings)
    return float(np.max(np.abs(onnx_embeddings - torch_embeddings) - allowed))


def trace_to_onnx(
    model: torch.nn.Module, sample_images: np.ndarray, output_names: Sequence[str]
) -> onnx.ModelProto:
    """``model`` (uint8 NHWC images in) as ONNX with a dynamic batch axis, torch.export-based."""
    # Trace with two images: a size-1 example lets torch.export specialise the
    # batch dimension to 1 despite the dynamic_shapes request.
    example = torch.from_numpy(np.ascontiguousarray(np.concatenate([sample_images[:1]] * 2)))
    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_IMAGES],
            output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    if program is None:  # only the TorchScript exporter returns None
        raise ExportError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


@contextlib.contextmanager
def _quiet(names: tuple[str, ...] = ("onnx_ir", "onnxscript")) -> Iterator[None]:
    """Hold the exporter's optimiser loggers at WARNING: at INFO they log every pass."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
