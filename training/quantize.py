"""A faster variant of an exported model, measured before it is published.

``int8``: onnxruntime's static quantization in QDQ form (per-channel int8
weights, uint8 activations), calibrated on training images drawn
stratified by class. Only the convolutional body is quantized: the in-graph
uint8 -> float normalisation before the first convolution, and everything
after the last one (pooling, ``embeddings``, the classifier head, and any
output this module does not know about, such as an ``ood_score``) stay in
float, so the I/O contract and the embeddings' precision do not change.

Whether the variant is worth serving is measured on this host, never
assumed (int8 speed-ups range from none to 2.5x across CPUs): held-out
accuracy of both, top-1 agreement, and images/s in alternating passes.
``auto`` keeps the variant only when it loses at most ``budget_points`` of
accuracy **and** is at least ``min_speedup`` times faster; otherwise the
float32 model is published and the card says why. Either way the card of the
published file records both variants' figures (``metrics``/``notes``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import INPUT_IMAGES
from tlserve.training.variants import (
    HeldOut,
    Measured,
    compare_variants,
    float_regions,
    name_nodes,
    record_decision,
)

__all__ = [
    "DEFAULT_BUDGET_POINTS",
    "DEFAULT_MIN_SPEEDUP",
    "QUANTIZE_MODES",
    "Decision",
    "decide",
    "make_variant",
    "quantize_int8",
    "select_variant",
]

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "fp16", "auto")
DEFAULT_BUDGET_POINTS = 0.5
DEFAULT_MIN_SPEEDUP = 1.2
_CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Decision:
    """Which variant was published and why, with the figures behind it."""

    chosen: str  # "float32" or the variant's name
    variant: str  # the candidate that was measured: "int8" or "fp16"
    reason: str
    measured: Measured

    def to_dict(self) -> dict[str, object]:
        """For report.json."""
        return {
            "chosen": self.chosen,
            "variant": self.variant,
            "reason": self.reason,
            **self.measured.to_dict(),
        }


def quantize_int8(source: Path, target: Path, calibration: np.ndarray) -> list[str]:
    """Write the static QDQ int8 quantization of ``source`` to ``target``.

    ``calibration`` is uint8 ``[N, H, W, 3]`` images, as the model takes them.
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
            calibration_providers=["CPUExecutionProvider"],
        )
    quantized = onnx.load(str(target))
    _keep_contract(model, quantized)
    onnx.save(quantized, str(target))
    log.info(
        "int8: quantized %s on %d calibration images; %d nodes kept in float",
        source.name,
        len(calibration),
        len(kept),
    )
    return kept


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


def decide(
    mode: str,
    variant: str,
    measured: Measured,
    *,
    budget_points: float = DEFAULT_BUDGET_POINTS,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
) -> tuple[str, str]:
    """``(chosen, reason)``: the variant when asked for, or when ``auto`` finds it worth it."""
    drop, speedup = measured.accuracy_drop_points, measured.speedup
    figures = (
        f"accuracy {_pct(measured.reference.accuracy)} -> {_pct(measured.candidate.accuracy)} "
        f"on {measured.held_out} held-out images, {speedup:.2f}x images/s on this host"
    )
    if mode == variant:
        return variant, f"{variant} asked for ({figures})"
    if drop is None:
        return "float32", f"no held-out images to check {variant} accuracy on; kept float32"
    if drop > budget_points:
        return "float32", (
            f"{variant} lost {drop:.2f} accuracy points (budget {budget_points:g}): kept "
            f"float32 ({figures})"
        )
    if speedup < min_speedup:
        return "float32", (
            f"{variant} measured only {speedup:.2f}x as fast here (needs {min_speedup:g}x): "
            f"kept float32 ({figures})"
        )
    return variant, f"{variant}: {figures}; within budget {budget_points:g} points"


def _pct(accuracy: float | None) -> str:
    return "n/a" if accuracy is None else f"{100 * accuracy:.2f}%"


def make_variant(variant: str, source: Path, target: Path, calibration: np.ndarray) -> None:
    """Write ``variant`` (``int8`` or ``fp16``) of ``source`` to ``target``."""
    if variant == "int8":
        quantize_int8(source, target, calibration)
    elif variant == "fp16":
        from tlserve.training.fp16 import convert_fp16

        convert_fp16(source, target)
    else:
        raise InvalidInput(f"unknown model variant {variant!r}; expected int8 or fp16")


def select_variant(
    exported: Path,
    calibration: np.ndarray,
    held_out: HeldOut | None,
    *,
    mode: str = "auto",
    budget_points: float = DEFAULT_BUDGET_POINTS,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    providers: Sequence[str] | None = None,
    seconds: float = 0.4,
    maker: Callable[[str, Path, Path, np.ndarray], None] = make_variant,
) -> Decision | None:
    """Make, measure and maybe keep a faster variant of ``exported``, in place.

    ``mode``: ``none`` (nothing happens, None returned), ``int8`` or ``fp16``
    (that variant is published whatever the figures, which are still
    recorded), ``auto`` (``fp16`` when ``providers`` start with a GPU one,
    else ``int8``; kept only within the accuracy and speed budgets). After
    the call ``exported`` holds the chosen model with both variants'
    figures in its card.
    """
    if mode not in QUANTIZE_MODES:
        raise InvalidInput(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "none":
        return None
    from tlserve.training.fp16 import gpu_providers

    gpu = gpu_providers(providers)
    variant = mode if mode != "auto" else ("fp16" if gpu else "int8")
    measure_on = list(gpu) if variant == "fp16" and gpu else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="tlserve-variant-") as tmp:
        candidate = Path(tmp) / f"model.{variant}.onnx"
        maker(variant, exported, candidate, calibration)
        measured = compare_variants(
            exported, candidate, held_out, name=variant, providers=measure_on, seconds=seconds
        )
        chosen, reason = decide(
            mode, variant, measured, budget_points=budget_points, min_speedup=min_speedup
        )
        decision = Decision(chosen, variant, reason, measured)
        if chosen != "float32":
            shutil.copyfile(candidate, exported)
    record_decision(exported, decision.chosen, decision.variant, decision.reason, measured)
    log.info("variant: publishing %s: %s", chosen, reason)
    return decision
