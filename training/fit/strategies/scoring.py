"""How ``auto`` scores a candidate: its validation rows, its cost tier, its serving time.

Shared by :mod:`~tlserve.training.fit.strategies.auto` and the modules it
calls (:mod:`.geometry`, :mod:`.ties`).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from tlserve.training.data.folders import DataError
from tlserve.training.features.extract import load_images
from tlserve.training.fit.selection import Score
from tlserve.training.fit.strategies.base import FitContext, FittedHead

__all__ = [
    "COMBINED",
    "COMBINING",
    "COST",
    "EARLIER_COST",
    "forward_ms",
    "frozen_score",
    "log_candidates",
    "progress",
]

log = logging.getLogger("tlserve.training.fit.strategies.auto")

# Tie-break order: cheaper to train (and, for trees, to serve) first. The whole
# part is the tier (selection.select): linear heads on any layer are tier 1.
# The near-tied linear heads averaged (.ties): one more candidate, one Gemm.
COMBINED = "linear@combined"
COST = {"linear": 1.0, "linear@multi": 1.2, COMBINED: 1.3, "trees": 2.0}
EARLIER_COST = 1.1
# The heads that combine the others (selection rule 3): all layers at once, the ties averaged.
COMBINING = frozenset({"linear@multi", COMBINED})


def forward_ms(context: FitContext) -> float:
    """Milliseconds per image of the backbone's forward pass, timed on one training batch."""
    paths = [path for path, _ in context.splits["train"][: context.batch_size]]
    images = torch.from_numpy(load_images(paths, context.backbone.preprocessing, limit=len(paths)))
    embedder = context.embedder
    embedder.eval()
    with torch.inference_mode():
        embedder(images[:2])  # warm-up: first-call allocations
        start = time.perf_counter()
        embedder(images)
    return 1000 * (time.perf_counter() - start) / len(images)


def frozen_score(
    context: FitContext, name: str, fitted: FittedHead, seconds: float, serve_ms: float
) -> Score:
    held = fitted.calibration
    if held is None:  # a class with one image: no folds, nothing to score on
        raise DataError(f"auto needs two training images per class to score {name}")
    paths = [str(p) for p in context.features("train", fitted.layer).paths]
    return Score(
        name=name,
        rows=tuple(paths),
        correct=held.logits.argmax(axis=1) == held.labels,
        cost=COST.get(name, EARLIER_COST),
        protocol=f"{fitted.params.get('folds', '?')}-fold CV on {len(paths)} training images",
        train_seconds=seconds,
        serve_ms_per_image=serve_ms,
        serve_cost_source="estimated from the backbone's measured forward time",
        figures={k: v for k, v in fitted.params.items() if k in ("C", "layer", "iterations")},
        combines=name in COMBINING,
    )


def log_candidates(scores: list[Score]) -> None:
    """One log line per scored candidate, cheapest first: accuracy, interval, rows, time."""
    for score in sorted(scores, key=lambda s: s.cost):
        low, high = score.interval
        log.info(
            "auto: %-13s %.1f%% [%.1f, %.1f] on %d rows, %.0f s",
            score.name,
            100 * score.accuracy,
            100 * low,
            100 * high,
            score.n,
            score.train_seconds,
        )


def progress(context: FitContext, what: str) -> None:
    left = context.seconds_left()
    log.info("auto [%s]: %s", "no budget" if math.isinf(left) else f"{left:.0f} s left", what)
