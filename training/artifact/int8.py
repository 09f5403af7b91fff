"""The int8 variant: onnxruntime's static quantization of the network's body.

Static QDQ quantization (per-channel int8 weights, uint8 activations),
calibrated on training images drawn stratified by class. Only the
convolutional body is quantized: the in-graph uint8 -> float normalisation
before the first convolution, and everything after the last one (pooling,
``embeddings``, the classifier head, and any output this module does not
know about, such as an ``ood_score``) stay in float, so the I/O contract and
the embeddings' precision do not change. Whether it is worth serving is
decided in :mod:`tlserve.training.artifact.quantize`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import CPU_PROVIDER, INPUT_IMAGES
from tlserve.training.artifact.variants import float_regions, name_nodes

__all__ = ["quantize_int8"]

log = logging.getLogger(__name__)

_CALIBRATION_BATCH = 16
_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


def quantize_int8(
    source: Path, target: Path, calibration: np.ndarray, *, reduce_range: bool = False
) -> list[str]:
    """Write the static QDQ int8 quantization of ``source`` to ``target``.

    ``calibration`` is uint8 ``[N, H, W, 3]`` images, as the model takes them.
    ``reduce_range``: 7-bit weights. On CPUs without VNNI (AVX2 only) onnxruntime
    multiplies u8 activations by s8 weights with an instruction whose 16-bit
    sums of two products saturate; with weights in [-64, 63] they cannot.
    Measured on the example model: full range lost 10.7 points on an AVX2 host
    and none on an AVX-512 VNNI one; 7-bit weights kept accuracy on both.
    Returns the names of the nodes kept in float (normalisation and tail).
    Every output and every ``metadata_props`` entry of ``source`` is kept.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if calibration.dtype != np.uint8 or calibration.ndim != 4 or len(calibration) == 0:
        raise InvalidInput(
            f"calibration images must be uint8 [N, H, W, 3] with N >= 1, got "
            f"{calibration.dtype} {list(calibration.shape)}"
        )
    model = onnx.load(str(source))
    name_nodes(model)
    kept = sorted(float_regions(model))
    _spread_normalisation(model, set(kept))
    with tempfile.TemporaryDirectory(prefix="tlserve-quantize-") as tmp, _quiet_root():
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        quantize_static(
            str(named),
            str(target),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=kept,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
            calibration_providers=[CPU_PROVIDER],
        )
    quantized = onnx.load(str(target))
    _keep_contract(model, quantized)
    onnx.save(quantized, str(target))
    log.info(
        "int8%s: quantized %s on %d calibration images; %d nodes kept in float",
        " (7-bit weights)" if reduce_range else "",
        source.name,
        len(calibration),
        len(kept),
    )
    return kept


def _spread_normalisation(model: onnx.ModelProto, kept: set[str]) -> None:
    """Give the float normalisation's per-channel constants the image's full shape.

    In the quantized graph onnxruntime moves the input's NHWC -> NCHW
    transpose past the normalisation (its int8 convolutions run NHWC), so a
    ``[1, C, 1, 1]`` scale broadcasts over runs of C = 3 values: measured on
    lite0 at 224 px, the normalisation's Mul and Add then took 26% of the int8
    model's time. Tiled to ``[1, C, H, W]`` the same products run over whole
    images. The arithmetic is unchanged, so the result is bit for bit the same.
    """
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim  # [N, H, W, C]
    height, width = dims[1].dim_value, dims[2].dim_value
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    front: set[str] = set()  # kept-float nodes fed by the image before any compute op
    stack = [graph.input[0].name]
    while stack:
        for node in users.get(stack.pop(), []):
            # Not through Shape: its output is the batch size, which also reaches the tail.
            if node.name in kept and node.name not in front and node.op_type != "Shape":
                front.add(node.name)
                stack.extend(node.output)
    for init in graph.initializer:
        shape, fed = tuple(init.dims), users.get(init.name, [])
        if not (height and width and fed and len(shape) == 4 and shape[0] == shape[2] == 1):
            continue
        if shape[3] == 1 and all(n.name in front and n.op_type in _ELEMENTWISE for n in fed):
            value = onnx.numpy_helper.to_array(init)
            tiled = np.broadcast_to(value, (1, shape[1], height, width))
            init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(tiled), init.name))
            stale = [v for v in graph.value_info if v.name == init.name]  # its old shape
            for info in stale:
                graph.value_info.remove(info)


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """Drop what onnxruntime's quantizer logs on the root logger below ERROR: a line per
    adjusted weight scale, and advice to pre-process the model (measured on lite0: the
    pre-processed model quantized no faster, so it is not done)."""

    def keep(record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.ERROR

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class _Batches:
    """onnxruntime's calibration reader protocol: ``get_next`` until None."""

    def __init__(self, images: np.ndarray) -> None:
        self._chunks = iter(
            images[i : i + _CALIBRATION_BATCH] for i in range(0, len(images), _CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {INPUT_IMAGES: chunk}


def _keep_contract(source: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """Same inputs, outputs (names, types, order) and metadata as the float model."""
    want = [
        (v.name, v.type.SerializeToString()) for v in [*source.graph.input, *source.graph.output]
    ]
    got = [
        (v.name, v.type.SerializeToString()) for v in [*result.graph.input, *result.graph.output]
    ]
    if want != got:
        raise ValueError(
            "quantization changed the model's inputs or outputs: "
            f"{[n for n, _ in want]} -> {[n for n, _ in got]}"
        )
    del result.metadata_props[:]
    result.metadata_props.extend(source.metadata_props)
