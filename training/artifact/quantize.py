"""Faster variants of an exported model, checked here before they are published beside it.

The variants (:mod:`tlserve.contract.variants`): ``int8`` and ``int8-rr``
(:mod:`tlserve.training.artifact.int8`, for CPUs; ``int8-rr`` has 7-bit weights, whose
products do not saturate on CPUs without VNNI) and ``fp16``
(:mod:`tlserve.training.artifact.fp16`, for GPUs).

The float32 model is always published. A variant is published beside it when
it passes the accuracy rule (:func:`tlserve.contract.variants.check_accuracy`)
on the version's reference set on this host, or when it was asked for by name.
Whether it serves is the serving host's decision (``tlserve serve`` checks it
again there, and times it): speed here is recorded, not required, because it
says little about another CPU. The card of ``model.onnx`` records every
variant's figures (``metrics``/``notes``), and report.json the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import CPU_PROVIDER
from tlserve.contract.variants import (
    CPU_VARIANTS,
    DEFAULT_BUDGET_POINTS,
    GPU_VARIANTS,
    AccuracyCheck,
    ReferenceSet,
    check_accuracy,
    variant_file,
)
from tlserve.training.artifact.variants import (
    HeldOut,
    Measured,
    compare_variants,
    load_session,
    record_variants,
    top1,
)

__all__ = [
    "QUANTIZE_MODES",
    "Outcome",
    "VariantReport",
    "build_variants",
    "make_variant",
    "variants_for",
]

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "fp16", "auto")


@dataclass(frozen=True)
class Outcome:
    """One variant as checked here: the reference-set check, held-out figures, the verdict."""

    variant: str
    check: AccuracyCheck
    measured: Measured
    published: bool
    reason: str


@dataclass(frozen=True)
class VariantReport:
    """What :func:`build_variants` made, checked and published.

    The run record keeps it as :class:`~tlserve.training.report.variant_section.VariantsRecord`.
    """

    mode: str
    budget_points: float
    reference_images: int
    reference_held_out: int
    outcomes: tuple[Outcome, ...]

    @property
    def published(self) -> tuple[str, ...]:
        return tuple(o.variant for o in self.outcomes if o.published)


def variants_for(mode: str, providers: Sequence[str] | None = None) -> tuple[str, ...]:
    """The variants ``mode`` makes: ``auto`` makes fp16 where a GPU provider exists, else int8."""
    if mode not in QUANTIZE_MODES:
        raise InvalidInput(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "none":
        return ()
    if mode == "auto":
        from tlserve.training.artifact.fp16 import gpu_providers

        return GPU_VARIANTS if gpu_providers(providers) else CPU_VARIANTS
    return CPU_VARIANTS if mode == "int8" else GPU_VARIANTS


def make_variant(variant: str, source: Path, target: Path, calibration: np.ndarray) -> None:
    """Write ``variant`` (``int8``, ``int8-rr`` or ``fp16``) of ``source`` to ``target``."""
    if variant in CPU_VARIANTS:
        from tlserve.training.artifact.int8 import quantize_int8

        quantize_int8(source, target, calibration, reduce_range=variant == "int8-rr")
    elif variant in GPU_VARIANTS:
        from tlserve.training.artifact.fp16 import convert_fp16

        convert_fp16(source, target)
    else:
        raise InvalidInput(f"unknown model variant {variant!r}; expected int8, int8-rr or fp16")


def build_variants(
    exported: Path,
    calibration: np.ndarray,
    reference: ReferenceSet,
    held_out: HeldOut | None,
    *,
    mode: str = "auto",
    budget_points: float = DEFAULT_BUDGET_POINTS,
    providers: Sequence[str] | None = None,
    seconds: float = 0.4,
    maker: Callable[[str, Path, Path, np.ndarray], None] = make_variant,
) -> VariantReport | None:
    """Make each variant ``mode`` asks for beside ``exported``, check it, keep what passes.

    A variant file that passes (or was asked for by name: ``int8``, ``fp16``)
    stays beside ``exported`` as ``variant_file(name)``; one that fails is
    deleted. Each is checked on ``reference`` (the rule the server applies
    again) and scored on ``held_out`` with its speed here, for the record.
    ``exported``'s card gets every figure. None when ``mode`` is ``none``.
    """
    variants = variants_for(mode, providers)
    if not variants:
        return None
    from tlserve.training.artifact.fp16 import gpu_providers

    gpu = gpu_providers(providers)
    outcomes = []
    for variant in variants:
        target = exported.with_name(variant_file(variant))
        maker(variant, exported, target, calibration)
        measure_on = list(gpu) if variant in GPU_VARIANTS and gpu else [CPU_PROVIDER]
        measured = compare_variants(
            exported, target, held_out, name=variant, providers=measure_on, seconds=seconds
        )
        answers = top1(load_session(target, measure_on), reference.images)
        check = check_accuracy(reference, answers, variant, budget_points)
        asked = mode != "auto"
        published = check.passed or asked
        verdict = "published" if check.passed else "published as asked" if asked else "dropped"
        reason = f"{verdict}: {check.reason}; {measured.speedup:.2f}x float32 images/s here"
        if not published:
            target.unlink()
        outcomes.append(Outcome(variant, check, measured, published, reason))
        log.info("variant %s", reason)
    report = VariantReport(
        mode, budget_points, len(reference.labels), reference.held_out, tuple(outcomes)
    )
    record_variants(
        exported,
        report.published,
        budget_points,
        {o.variant: (o.reason, o.measured) for o in outcomes},
    )
    return report
