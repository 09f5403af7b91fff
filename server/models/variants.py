"""Which variant of a model version serves here: checked and timed on this host at load.

A version folder holds the float32 ``model.onnx`` and may hold faster variants
with a reference set (:mod:`tlserve.contract.variants`). int8 kernels differ by
CPU (without VNNI, u8 x s8 products saturate), so what passed on the training
host proves nothing here. Before a version is ready, :func:`choose_variant`
runs each variant of the kind this provider wants (int8 on CPU, fp16 on a GPU)
on the reference set and applies the accuracy rule training applied, with the
budget in the card; a variant that fails is never served. One that passes is
served under ``--variant auto`` only if it also measured at least
``DEFAULT_MIN_SPEEDUP`` times float32's images/s here, in alternating passes.
``--variant float32`` skips the check; ``--variant int8`` (or ``fp16``) serves
that kind without the speed test, and refuses to load the version when no file
of that kind passes the accuracy check.

The choice and its reason go to the log, to ``ModelConfig.parameters`` and to
the ``tlserve_model_variant`` gauge.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlserve.contract.card import ModelCard
from tlserve.contract.errors import InvalidInput, NotAllowed
from tlserve.contract.rules import GPU_PROVIDERS, INPUT_IMAGES, MODEL_FILE, OUTPUT_PROBABILITIES
from tlserve.contract.variants import (
    CPU_VARIANTS,
    DEFAULT_BUDGET_POINTS,
    DEFAULT_MIN_SPEEDUP,
    GPU_VARIANTS,
    REFERENCE_FILE,
    SPEED_BATCHES,
    SPEED_PASSES,
    ReferenceSet,
    check_accuracy,
    host_cpu,
    kind_of,
    variant_file,
)
from tlserve.server.config import ServerConfig
from tlserve.server.models.runtime import OnnxModel, load_model

__all__ = ["VariantChoice", "choose_variant", "speedup"]

log = logging.getLogger(__name__)

_SLICE_SECONDS = 0.15

Loader = Callable[..., OnnxModel]


@dataclass(frozen=True)
class VariantChoice:
    """The file a version serves, why, and on what CPU that was decided."""

    variant: str  # float32, int8, int8-rr or fp16
    path: Path
    source: str  # "measured", "explicit" or "only" (nothing to choose from)
    reason: str
    host: str


def choose_variant(
    version_dir: Path, config: ServerConfig, *, loader: Loader = load_model
) -> VariantChoice:
    """Check the version's variants on this host and pick the one to serve.

    Blocking (it runs models): call it in a thread. Raises :class:`NotAllowed`
    when ``config.variant`` names a kind this version has no passing file of.
    """
    host = host_cpu()
    floating = version_dir / MODEL_FILE
    asked = config.variant

    def choice(variant: str, source: str, reason: str) -> VariantChoice:
        path = version_dir / variant_file(variant)
        return VariantChoice(variant, path, source, reason, host)

    reference_model = loader(floating, config)
    card = reference_model.card
    if card is not None and card.notes.get("variant", "float32") != "float32":
        # An older tlserve replaced model.onnx with its int8 file: nothing to compare.
        if asked not in ("auto", kind_of(card.notes["variant"])):
            raise NotAllowed(
                f"--variant {asked} refused for {version_dir}: its model.onnx is the "
                f"{card.notes['variant']} variant an older tlserve published, and there is "
                "no other file"
            )
        return VariantChoice(
            card.notes["variant"], floating, "only",
            f"model.onnx is the {card.notes['variant']} variant an older tlserve published, "
            "without a reference set: served as published, unchecked on this host "
            "(republish it with `tlserve quantize` to have it checked)", host,
        )  # fmt: skip
    if asked == "float32":
        return choice("float32", "explicit", "float32 asked for (--variant float32)")
    on_gpu = reference_model.provider in GPU_PROVIDERS
    kinds: tuple[str, ...] = GPU_VARIANTS if on_gpu else CPU_VARIANTS
    if asked != "auto":
        kinds = tuple(v for v in (*CPU_VARIANTS, *GPU_VARIANTS) if kind_of(v) == asked)
    present = [v for v in kinds if (version_dir / variant_file(v)).is_file()]
    reference_file = version_dir / REFERENCE_FILE
    if not present or not reference_file.is_file():
        wanted = asked if asked != "auto" else "/".join(kinds)
        missing = (
            f"no {wanted} variant"
            if not present
            else f"no {REFERENCE_FILE} to check its variants against"
        )
        if asked != "auto":
            raise NotAllowed(f"--variant {asked} refused for {version_dir}: {missing}")
        return choice("float32", "only", f"{missing}: float32 serves")
    try:
        reference = ReferenceSet.load(reference_file)
    except InvalidInput as exc:
        if asked != "auto":
            raise NotAllowed(f"--variant {asked} refused for {version_dir}: {exc}") from exc
        return choice("float32", "only", f"{exc}: float32 serves")
    budget = _budget(card)
    refused: list[str] = []
    for variant in present:
        try:
            model = loader(version_dir / variant_file(variant), config)
            answers = _top1(model, reference.images)
        except Exception as exc:  # an optional file that cannot run here is not served
            refused.append(f"{variant} did not run here: {exc}")
            continue
        check = check_accuracy(reference, answers, variant, budget)
        if not check.passed:
            refused.append(check.reason)
            continue
        if asked != "auto":
            return choice(variant, "explicit", f"{variant} asked for; {check.reason}")
        ratio = speedup(reference_model, model, reference.images)
        if ratio < DEFAULT_MIN_SPEEDUP:
            refused.append(
                f"{check.reason}, but only {ratio:.2f}x float32 images/s here "
                f"(needs {DEFAULT_MIN_SPEEDUP:g}x)"
            )
            continue
        return choice(variant, "measured", f"{check.reason}; {ratio:.2f}x float32 images/s here")
    if asked != "auto":
        raise NotAllowed(f"--variant {asked} refused for {version_dir}: {'; '.join(refused)}")
    return choice("float32", "measured", "float32 serves: " + "; ".join(refused))


def _budget(card: ModelCard | None) -> float:
    """The accuracy budget the card states (``variant_budget_points``), else the default."""
    try:
        return float(card.notes["variant_budget_points"]) if card else DEFAULT_BUDGET_POINTS
    except (KeyError, ValueError):
        return DEFAULT_BUDGET_POINTS


def _top1(model: OnnxModel, images: np.ndarray, batch: int = 32) -> np.ndarray:
    rows = [
        model.run({INPUT_IMAGES: images[i : i + batch]})[OUTPUT_PROBABILITIES]
        for i in range(0, len(images), batch)
    ]
    return np.asarray(np.concatenate(rows).argmax(axis=1), dtype=np.int64)


def speedup(reference: OnnxModel, candidate: OnnxModel, images: np.ndarray) -> float:
    """``candidate``'s images/s over ``reference``'s at the slower of :data:`SPEED_BATCHES`.

    Each pass times both back to back, so drift on a shared host hits both
    alike; the figure per batch size is the median of the per-pass ratios.
    """
    ratios = []
    for batch in SPEED_BATCHES:
        feeds = {INPUT_IMAGES: np.resize(images, (batch, *images.shape[1:]))}
        for model in (reference, candidate):
            model.run(feeds)  # this shape's first run allocates
        per_pass = [
            _rate(candidate, feeds, batch) / _rate(reference, feeds, batch)
            for _ in range(SPEED_PASSES)
        ]
        ratios.append(statistics.median(per_pass))
    return min(ratios)


def _rate(model: OnnxModel, feeds: dict[str, np.ndarray], batch: int) -> float:
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < _SLICE_SECONDS or runs < 2:
        model.run(feeds)
        runs += 1
    return runs * batch / elapsed
