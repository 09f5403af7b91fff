"""The float16 variant, for the CUDA and TensorRT execution providers.

The body of the network runs in float16; the in-graph uint8 -> float
normalisation and everything after the last convolution (embeddings, head,
other outputs) stay float32, and the graph's inputs and outputs keep their
types, so clients see the same contract. The conversion is onnxruntime's own
(``onnxruntime.transformers.float16``) and runs anywhere; its accuracy and
speed are checked by :func:`tlserve.training.artifact.quantize.select_variant` like
int8's, on the GPU when there is one (on a CPU host the figures are the CPU's
and say so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnx

from tlserve.contract.rules import CPU_PROVIDER, GPU_PROVIDERS
from tlserve.training.artifact.variants import float_regions, name_nodes

__all__ = ["convert_fp16", "gpu_providers"]

log = logging.getLogger(__name__)


def convert_fp16(source: Path, target: Path) -> list[str]:
    """Write the float16 variant of ``source`` to ``target``; return the nodes kept float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    name_nodes(model)
    kept = sorted(float_regions(model))
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=kept, disable_shape_infer=False
    )
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    onnx.save(converted, str(target))
    log.info("fp16: converted %s; %d nodes kept in float32", source.name, len(kept))
    return kept


def gpu_providers(providers: Sequence[str] | None = None) -> tuple[str, ...]:
    """The GPU providers among ``providers`` (default: this onnxruntime's), then CPU.

    Empty when there is no GPU provider: the caller then measures on CPU.
    """
    if providers is None:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    found = tuple(p for p in providers if p in GPU_PROVIDERS)
    return (*found, CPU_PROVIDER) if found else ()
