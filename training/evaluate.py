"""Held-out evaluation: accuracy, per-class accuracy, confusion matrix, calibration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Evaluation", "evaluate"]

_CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Evaluation:
    """Figures on one split. ``confusion[true][predicted]`` counts images."""

    n: int
    accuracy: float
    per_class_accuracy: dict[str, float | None]  # None: no image of that class
    confusion: list[list[int]]
    expected_calibration_error: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion": self.confusion,
            "expected_calibration_error": self.expected_calibration_error,
        }


def evaluate(probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Evaluation:
    """Score ``probabilities`` ``[N, C]`` against integer ``labels`` ``[N]`` (N > 0)."""
    if len(labels) == 0:
        raise ValueError("nothing to evaluate: no images")
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        total = int(confusion[index].sum())
        per_class[name] = float(confusion[index, index] / total) if total else None
    return Evaluation(
        n=len(labels),
        accuracy=float(correct.mean()),
        per_class_accuracy=per_class,
        confusion=confusion.tolist(),
        expected_calibration_error=_ece(probabilities.max(axis=1), correct),
    )


def _ece(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over confidence bins."""
    bins = np.minimum((confidence * _CALIBRATION_BINS).astype(np.int64), _CALIBRATION_BINS - 1)
    error = 0.0
    for b in np.unique(bins):
        members = bins == b
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)
