"""A classification result and the one top-k ranking both sides use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Prediction", "top_k"]


@dataclass(frozen=True)
class Prediction:
    """One label of a classification, best first."""

    label: str
    index: int
    score: float


def top_k(row: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """The ``k`` best of one probability row, ties broken stably (lower index first).

    A class index past ``labels`` (a model without a card) is named by its number.
    """
    k = max(1, min(k, row.shape[-1]))
    best = np.argsort(-row, kind="stable")[:k]
    return [
        Prediction(labels[i] if i < len(labels) else str(i), int(i), float(row[i])) for i in best
    ]
