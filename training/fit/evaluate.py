"""Held-out evaluation: accuracy, macro-F1, per-class precision/recall, confusion, calibration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

__all__ = [
    "ClassFigures",
    "Evaluation",
    "binned_calibration_error",
    "evaluate",
    "expected_calibration_error",
]

_CALIBRATION_BINS = 10


@dataclass(frozen=True)
class ClassFigures:
    """One class on one split; a ratio is None where it is undefined (never predicted, absent)."""

    precision: float | None
    recall: float | None
    f1: float | None
    support: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassFigures:
        return cls(
            precision=_optional(data.get("precision")),
            recall=_optional(data.get("recall")),
            f1=_optional(data.get("f1")),
            support=int(data.get("support") or 0),
        )


@dataclass(frozen=True)
class Evaluation:
    """Figures on one split. ``confusion[true][predicted]`` counts images."""

    n: int
    accuracy: float
    per_class_accuracy: dict[str, float | None]  # None: no image of that class
    confusion: list[list[int]]
    expected_calibration_error: float
    macro_f1: float = 0.0
    per_class: dict[str, ClassFigures] = field(default_factory=dict)
    # per confidence bin: [mean confidence, accuracy, count] (empty bins left out)
    reliability: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class_accuracy": self.per_class_accuracy,
            "per_class": {name: asdict(figures) for name, figures in self.per_class.items()},
            "confusion": self.confusion,
            "expected_calibration_error": self.expected_calibration_error,
            "reliability": self.reliability,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """Read :meth:`to_dict`'s output back (``report.json``'s ``evaluation``)."""
        return cls(
            n=int(data["n"]),
            accuracy=float(data["accuracy"]),
            per_class_accuracy={
                str(k): _optional(v) for k, v in data.get("per_class_accuracy", {}).items()
            },
            confusion=[[int(c) for c in row] for row in data.get("confusion", [])],
            expected_calibration_error=float(data.get("expected_calibration_error", 0.0)),
            macro_f1=float(data.get("macro_f1", 0.0)),
            per_class={
                str(k): ClassFigures.from_dict(v) for k, v in data.get("per_class", {}).items()
            },
            reliability=[[float(x) for x in row] for row in data.get("reliability", [])],
        )


def evaluate(probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Evaluation:
    """Score ``probabilities`` ``[N, C]`` against integer ``labels`` ``[N]`` (N > 0)."""
    if len(labels) == 0:
        raise ValueError("nothing to evaluate: no images")
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    every = np.arange(len(classes))
    confusion = confusion_matrix(labels, predicted, labels=every)
    # nan where a ratio is undefined (no image of the class, or never
    # predicted): reported as None, and such classes stay out of macro-F1.
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=every, zero_division=np.nan
    )
    per_class = {
        name: ClassFigures(
            precision=_defined(precision[index]),
            recall=_defined(recall[index]),
            f1=_defined(f1[index]),
            support=int(support[index]),
        )
        for index, name in enumerate(classes)
    }
    per_class_accuracy = {name: figures.recall for name, figures in per_class.items()}
    present = support > 0
    confidence = probabilities.max(axis=1)
    return Evaluation(
        n=len(labels),
        accuracy=float(correct.mean()),
        per_class_accuracy=per_class_accuracy,
        confusion=confusion.tolist(),
        expected_calibration_error=binned_calibration_error(confidence, correct),
        macro_f1=float(np.mean(np.nan_to_num(f1[present]))),
        per_class=per_class,
        reliability=_reliability(confidence, correct),
    )


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def _reliability(confidence: np.ndarray, correct: np.ndarray) -> list[list[float]]:
    bins = np.minimum((confidence * _CALIBRATION_BINS).astype(np.int64), _CALIBRATION_BINS - 1)
    return [
        [
            float(confidence[bins == b].mean()),
            float(correct[bins == b].mean()),
            int((bins == b).sum()),
        ]
        for b in np.unique(bins)
    ]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """ECE of ``probabilities`` ``[N, C]`` against ``labels`` (10 equal-width bins)."""
    correct = probabilities.argmax(axis=1) == labels
    return binned_calibration_error(probabilities.max(axis=1), correct)


def binned_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """ECE from each row's ``confidence`` and whether it was ``correct``.

    |accuracy - confidence| in each of 10 equal-width confidence bins,
    averaged with the bins' sizes as weights. By hand: scikit-learn has no
    multi-class ECE (``calibration_curve`` bins one binary class's scores).
    """
    bins = np.minimum((confidence * _CALIBRATION_BINS).astype(np.int64), _CALIBRATION_BINS - 1)
    error = 0.0
    for b in np.unique(bins):
        members = bins == b
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)
