"""A faster variant of an exported model, measured before it is published.

The variants: ``int8`` (:mod:`tlserve.training.int8`, for CPUs) and ``fp16``
(:mod:`tlserve.training.fp16`, for GPUs).

Whether the variant is worth serving is measured on this host, never
assumed (int8 speed-ups range from none to 2.5x across CPUs): held-out
accuracy of both, top-1 agreement, and images/s in alternating passes.
``auto`` keeps the variant only when it loses at most ``budget_points`` of
accuracy **and** is at least ``min_speedup`` times faster; otherwise the
float32 model is published and the card says why. Either way the card of the
published file records both variants' figures (``metrics``/``notes``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlserve.contract.errors import InvalidInput
from tlserve.training.variants import HeldOut, Measured, compare_variants, record_decision

__all__ = [
    "DEFAULT_BUDGET_POINTS",
    "DEFAULT_MIN_SPEEDUP",
    "QUANTIZE_MODES",
    "Decision",
    "decide",
    "make_variant",
    "select_variant",
]

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "fp16", "auto")
DEFAULT_BUDGET_POINTS = 0.5
DEFAULT_MIN_SPEEDUP = 1.2


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
        from tlserve.training.int8 import quantize_int8

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
