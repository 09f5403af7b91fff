"""Input geometry chosen by measurement: centre crop or whole image, native or larger size.

The backbone's own preprocessing (resize, centre crop 0.875) cuts off every
image's border, where the defects of inspection images often are, and its
native size may lose small details in large scans. :func:`measure_geometry`
scores the last-layer linear probe at each candidate geometry
(:func:`geometry_candidates`) on the same folds as every head, and the
context adopts the winner: every later candidate (heads, trained backbones)
uses it, and the exported model card carries it, so the server prepares
images as training measured. Another geometry replaces the backbone's only
when it beats it by more than one standard error of the paired difference
(:func:`geometry_score` puts each in a dearer tier for
:func:`~tlserve.training.fit.selection.select`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tlserve.contract.card import Preprocessing
from tlserve.training.fit.selection import Score, select
from tlserve.training.fit.strategies.base import FitContext, FittedHead
from tlserve.training.fit.strategies.budget import EMBED_PER_FORWARD
from tlserve.training.fit.strategies.linear import LinearProbe
from tlserve.training.fit.strategies.scoring import forward_ms, frozen_score, progress

__all__ = [
    "LARGER_INPUT",
    "Geometry",
    "describe_geometry",
    "geometry_candidates",
    "geometry_score",
    "measure_geometry",
    "source_side",
]

# A larger input for small-detail data: the backbone's size times this, to a multiple of 32.
LARGER_INPUT = 1.25
EXPORT_SECONDS = 10.0  # exporting the embedder at a new size, and its check


@dataclass(frozen=True)
class Geometry:
    """The geometry ``auto`` adopted: its last-layer probe and score, the others tried."""

    fitted: FittedHead
    score: Score
    others: tuple[Score, ...]
    forward_ms: float | None  # re-measured when the input size changed


def describe_geometry(spec: Preprocessing) -> str:
    """``centre crop 0.875 at 224 px`` or ``whole image at 288 px``."""
    what = "whole image" if spec.crop_pct >= 1.0 else f"centre crop {spec.crop_pct:g}"
    size = f"{spec.height}" if spec.height == spec.width else f"{spec.height}x{spec.width}"
    return f"{what} at {size} px"


def geometry_candidates(
    current: Preprocessing, side: float | None, stage: str
) -> list[Preprocessing]:
    """Geometries to score against ``current``.

    ``crop``: the whole image at the same size, when ``current`` crops (a
    centre crop cuts off every image's border, where the defects of
    inspection images often are). ``size``: :data:`LARGER_INPUT` times the
    size, only when the training images' median shorter ``side`` (pixels)
    has that many pixels: upsampling adds no detail, only compute.
    """
    if stage == "crop":
        return [dataclasses.replace(current, crop_pct=1.0)] if current.crop_pct < 1.0 else []
    if stage != "size":
        raise ValueError(f"unknown geometry stage {stage!r}")
    now = max(current.height, current.width)
    larger = max(now + 32, math.ceil(now * LARGER_INPUT / 32) * 32)
    if side is None or side < larger:
        return []
    scale = larger / max(current.height, current.width)
    height, width = round(current.height * scale), round(current.width * scale)
    return [dataclasses.replace(current, height=height, width=width)]


def source_side(paths: Sequence[Path], sample: int = 25) -> float | None:
    """Median shorter side, in pixels, of up to ``sample`` of ``paths`` (headers only)."""
    sides = []
    step = max(1, len(paths) // sample)
    for path in list(paths)[::step][:sample]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except OSError:
            continue
    return float(statistics.median(sides)) if sides else None


def geometry_score(
    score: Score, spec: Preprocessing, base: Preprocessing, chosen: bool = False
) -> Score:
    """``score`` named for its geometry, in its tier: another must beat the backbone's by 1 SE.

    The backbone's own geometry is tier 1, the whole image tier 2 (switching
    costs another pass over the held-out images, and a point estimate inside
    the noise is the coin flip the near-tie rule avoids), a larger input
    tier 3 (it also costs more to serve).
    """
    larger = spec.height * spec.width > base.height * base.width
    cost = 3.0 if larger else 1.0 if spec == base else 2.0
    name = f"linear, {describe_geometry(spec)}" + (" (adopted)" if chosen else "")
    return dataclasses.replace(
        score, name=name, cost=cost, figures={**score.figures, "geometry": describe_geometry(spec)}
    )


def measure_geometry(
    context: FitContext, folds: int, serve_ms: float, deadline: float | None, notes: list[str]
) -> Geometry:
    """Score the last-layer probe at each input geometry; ``context`` adopts the winner's.

    Candidates (:func:`geometry_candidates`): the backbone's own (resize,
    centre crop), the whole image at the same size, and, when the
    training images have the pixels for it, a larger size. Each costs one
    more forward pass over the training images; one the time budget
    cannot afford is not scored, and the notes say so.
    """
    base = context.backbone.preprocessing
    progress(context, f"trying linear ({folds}-fold CV) at {describe_geometry(base)}")
    started = time.perf_counter()
    fitted = LinearProbe(folds=folds).fit(context)
    score = frozen_score(context, "linear", fitted, time.perf_counter() - started, serve_ms)
    tried = [(base, context, fitted, score)]
    n_train = len(context.splits["train"])
    side = source_side([path for path, _ in context.splits["train"]])
    crop_winner = 0
    for stage in ("crop", "size"):
        current = tried[crop_winner][0]
        for spec in geometry_candidates(current, side, stage):
            scale = spec.height * spec.width / (base.height * base.width)
            export = (
                EXPORT_SECONDS
                if (spec.height, spec.width) != (current.height, current.width)
                else 0.0
            )
            projected = EMBED_PER_FORWARD * n_train * serve_ms / 1000 * scale + export
            left = math.inf if deadline is None else deadline - time.monotonic()
            if projected > left:
                notes.append(
                    f"Geometry {describe_geometry(spec)} not scored: one pass over the "
                    f"training images is projected at {projected:.0f} s, {max(left, 0):.0f} s "
                    "left in the time budget."
                )
                continue
            progress(context, f"trying linear at {describe_geometry(spec)}")
            other = context.with_preprocessing(spec)
            started = time.perf_counter()
            fitted_g = LinearProbe(folds=folds).fit(other)
            seconds = time.perf_counter() - started
            tried.append(
                (
                    spec,
                    other,
                    fitted_g,
                    frozen_score(other, "linear", fitted_g, seconds, serve_ms * scale),
                )
            )
        if stage == "crop":
            crop_winner = _pick(tried, base)
    best = _pick(tried, base)
    spec, chosen_context, fitted, score = tried[best]
    labelled = [geometry_score(s, g, base, i == best) for i, (g, _, _, s) in enumerate(tried)]
    remeasured = None
    if len(tried) > 1:
        selection = select([geometry_score(s, g, base) for g, _, _, s in tried])
        notes.append(f"Geometry: {selection.reason}.")
    if chosen_context is not context:
        context.adopt(chosen_context)
        if (spec.height, spec.width) != (base.height, base.width):
            remeasured = forward_ms(context)
    others = tuple(labelled) if len(tried) > 1 else ()
    return Geometry(fitted, score, others, remeasured)


def _pick(
    tried: list[tuple[Preprocessing, FitContext, FittedHead, Score]], base: Preprocessing
) -> int:
    scores = [geometry_score(s, g, base) for g, _, _, s in tried]
    winner = select(scores).winner
    return next(i for i, s in enumerate(scores) if s.name == winner.name)
