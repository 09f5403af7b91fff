"""Validation for the backbone-training runs: the held-out images, the score, early stopping.

Train and validation images are decoded once (:func:`prepare_run_images`)
and shared by every run ``auto`` races. After every epoch a run scores the
validation images; :class:`EarlyStopping` keeps the best epoch's weights
(highest accuracy, then lowest loss) and says when ``patience`` epochs have
passed without improvement, so a run ends on its best epoch, not its last.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tlserve.training.data.folders import split_samples
from tlserve.training.features.extract import SkippedFile, prepare_images
from tlserve.training.fit.loops import evaluate_logits
from tlserve.training.fit.strategies.base import FitContext

__all__ = ["EarlyStopping", "PreparedImages", "prepare_run_images", "validate"]

log = logging.getLogger(__name__)


@dataclass
class EarlyStopping:
    """The best epoch so far (highest validation accuracy, then lowest loss) and its weights."""

    patience: int = 3
    best_epoch: int = 0
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_state: dict[str, torch.Tensor] | None = None
    best_logits: np.ndarray | None = None
    since_best: int = 0

    def update(
        self, epoch: int, accuracy: float, loss: float, network: torch.nn.Module, logits: np.ndarray
    ) -> bool:
        """Record ``epoch``'s score; return True when training should stop."""
        if accuracy > self.best_accuracy or (
            accuracy == self.best_accuracy and loss < self.best_loss
        ):
            self.best_epoch, self.best_accuracy, self.best_loss = epoch, accuracy, loss
            self.best_state = copy.deepcopy(network.state_dict())
            self.best_logits = logits
            self.since_best = 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, network: torch.nn.Module) -> None:
        if self.best_state is not None:
            network.load_state_dict(self.best_state)

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class PreparedImages:
    """Decoded training and validation images (decoded once, shared by every run)."""

    images: np.ndarray
    labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    val_rows: tuple[str, ...]  # the validation images' paths
    skipped: tuple[SkippedFile, ...]
    carved: bool  # val was held out of train/ (no val/ folder)
    seconds: float = 0.0


def prepare_run_images(context: FitContext, val_fraction: float) -> PreparedImages:
    """Train and validation images: ``val/`` if given, else a stratified slice of train."""
    start = time.perf_counter()
    train, val = list(context.splits["train"]), list(context.splits.get("val", []))
    carved = False
    if not val and 0.0 < val_fraction < 1.0:
        train, val = split_samples(train, val_fraction, seed=context.seed)
        carved = bool(val)
        log.info("validation: %d training images held out (no val/)", len(val))
    spec = context.backbone.preprocessing
    images, labels, skipped = prepare_images(train, spec, workers=context.workers)
    if val:
        val_images, val_labels, val_skipped = prepare_images(val, spec, workers=context.workers)
    else:
        val_images = np.zeros((0, spec.height, spec.width, 3), np.uint8)
        val_labels, val_skipped = np.zeros((0,), np.int64), ()
    bad = {s.path for s in val_skipped}
    rows = tuple(str(path) for path, _ in val if path not in bad)
    return PreparedImages(
        images,
        labels,
        val_images,
        val_labels,
        rows,
        (*skipped, *val_skipped),
        carved,
        time.perf_counter() - start,
    )


def validate(
    network: torch.nn.Module, data: PreparedImages, batch_size: int = 64
) -> tuple[float, float, np.ndarray]:
    """(accuracy, loss, logits) on the validation images."""
    logits = evaluate_logits(network, data.val_images, batch_size)
    loss = float(
        torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(data.val_labels)
        )
    )
    return float((logits.argmax(1) == data.val_labels).mean()), loss, logits
