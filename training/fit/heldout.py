"""Logits of images a model did not train on: to evaluate it and to fit its temperature."""

from __future__ import annotations

import logging

import numpy as np

from tlserve.training.features.extract import Features, extract_features
from tlserve.training.fit.heads import head_logits
from tlserve.training.fit.strategies import FitContext, FittedHead

__all__ = ["calibration_sets", "held_out_logits"]

log = logging.getLogger(__name__)


def calibration_sets(
    fitted: FittedHead, val: tuple[np.ndarray, np.ndarray] | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Held-out logits to fit T on: the strategy's own and val/'s.

    Frozen-feature heads give out-of-fold logits of every training image (as
    many rows as train has: enough to be sure of T); backbone-training ones
    the slice held out of train/ when there is no val/.
    """
    sets = []
    if fitted.calibration is not None:
        own = fitted.calibration
        sets.append((own.source, own.logits, own.labels))
    if val is not None:
        sets.append(("validation images", *val))
    return sets


def held_out_logits(
    context: FitContext, fitted: FittedHead, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Uncalibrated logits and labels of ``split`` (None if it has no readable image)."""
    samples = context.splits.get(split, [])
    if not samples:
        return None
    features: Features
    if not fitted.trained_backbone:  # frozen backbone: reuse cached features
        features = context.features(split, fitted.layer)
    else:
        features = extract_features(
            fitted.embedder, samples, batch_size=context.batch_size, workers=context.workers
        )
    if len(features.labels) == 0:
        log.warning("no readable %s images: cannot evaluate on %s", split, split)
        return None
    return head_logits(fitted.head, features.embeddings), features.labels
