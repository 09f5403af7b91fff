"""A classification result and the one top-k ranking both sides use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_TOP_K",
    "OOD_THRESHOLD_METRIC",
    "Classification",
    "Prediction",
    "classifications",
    "is_out_of_distribution",
    "ood_threshold",
    "top_k",
]

#: Labels a classification returns when the caller asks for none (``top_k`` 0).
DEFAULT_TOP_K = 5

#: The model card metric holding the ``ood_score`` above which an image is
#: flagged out of distribution (written at export, read when serving).
OOD_THRESHOLD_METRIC = "ood_threshold"


@dataclass(frozen=True)
class Prediction:
    """One label of a classification, best first."""

    label: str
    index: int
    score: float


class Classification(list[Prediction]):
    """The top-k :class:`Prediction` s of one image, best first, and how unusual the image is.

    A list, so code that iterates or indexes the predictions is unchanged.
    ``ood_score`` is how unlike the model's training data the image is
    (higher: less like it), None for a model without that output;
    ``out_of_distribution`` says it is above the model's threshold.
    """

    def __init__(
        self,
        predictions: Iterable[Prediction] = (),
        *,
        ood_score: float | None = None,
        out_of_distribution: bool = False,
    ) -> None:
        super().__init__(predictions)
        self.ood_score = ood_score
        self.out_of_distribution = out_of_distribution

    def __repr__(self) -> str:
        return (
            f"Classification({list.__repr__(self)}, ood_score={self.ood_score!r}, "
            f"out_of_distribution={self.out_of_distribution!r})"
        )


def ood_threshold(metrics: Mapping[str, float]) -> float | None:
    """The threshold in a model card's metrics, None when the model has none."""
    value = metrics.get(OOD_THRESHOLD_METRIC)
    return None if value is None else float(value)


def is_out_of_distribution(score: float | None, threshold: float | None) -> bool:
    """A score above the threshold; never flagged when either is missing."""
    return score is not None and threshold is not None and score > threshold


def top_k(row: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """The ``k`` best of one probability row, ties broken stably (lower index first).

    A class index past ``labels`` (a model without a card) is named by its number.
    """
    k = max(1, min(k, row.shape[-1]))
    best = np.argsort(-row, kind="stable")[:k]
    return [
        Prediction(labels[i] if i < len(labels) else str(i), int(i), float(row[i])) for i in best
    ]


def classifications(
    probabilities: np.ndarray,
    labels: Sequence[str],
    k: int,
    scores: np.ndarray | None = None,
    threshold: float | None = None,
) -> list[Classification]:
    """One :class:`Classification` per probability row: the server's and the client's ranking.

    ``k`` 0 means :data:`DEFAULT_TOP_K` (a proto's unset ``top_k``); ``scores``
    are the model's ``ood_score`` rows, flagged against ``threshold``.
    """
    k = k or DEFAULT_TOP_K
    results = []
    for i, row in enumerate(probabilities):
        score = None if scores is None else float(scores[i])
        flagged = is_out_of_distribution(score, threshold)
        results.append(
            Classification(top_k(row, labels, k), ood_score=score, out_of_distribution=flagged)
        )
    return results
