"""The suspects a data check names: likely label issues and near-duplicate pairs.

Label issues: cleanlab's confident learning (``find_label_issues``) on the
probe's held-out probabilities; without cleanlab, the same rule implemented
here (:func:`confident_learning`). Near-duplicates: pairs of images whose
unit-length embeddings have a dot product of at least a threshold.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from tlserve.training.data.folders import Sample
from tlserve.training.features.extract import Features
from tlserve.training.fit.heads import head_logits, softmax
from tlserve.training.fit.strategies.linear import fit_logistic_regression

__all__ = [
    "DUPLICATE_SIMILARITY",
    "DuplicatePair",
    "LabelIssue",
    "confident_learning",
    "label_issues",
    "near_duplicates",
    "without_duplicates",
]

log = logging.getLogger(__name__)

#: Cosine similarity of two embeddings (tf_efficientnet_lite0) above which
#: the images are called near-duplicates. Measured: a natural photo and its
#: JPEG q75 / 70% resized / 95% crop copies, medians 0.991 / 0.997 / 0.977;
#: distinct photos at most 0.49; on the example garments (28x28, many alike)
#: the most similar distinct pair is 0.955; on MNIST digits some distinct but
#: look-alike strokes (plain "1"s) reach 0.97-0.98, so they are listed too:
#: a finding says where to look, it drops nothing.
DUPLICATE_SIMILARITY = 0.97
_FOLDS = 5
# The probe runs on the embeddings' first principal components: 64 keep
# nearly all of its accuracy on the example data (82.9% vs 84.8% CV) at a
# tenth of the time, and the check only has to rank suspects.
_PROBE_COMPONENTS = 64
_PROBE_C = (0.01, 0.1, 1.0)
_CHUNK = 1024  # rows of the similarity matrix computed at a time (memory bound)


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given label the probe confidently disagrees with.

    ``given_probability`` is the probe's (held-out) probability of the given
    label: lower is more suspect. ``predicted`` is its best label, with
    ``predicted_probability``.
    """

    path: str
    split: str
    given: str
    predicted: str
    given_probability: float
    predicted_probability: float


@dataclass(frozen=True)
class DuplicatePair:
    """Two images with near-identical embeddings; a ``leak`` when in different splits."""

    a: str
    b: str
    split_a: str
    split_b: str
    similarity: float

    @property
    def leak(self) -> bool:
        return self.split_a != self.split_b


def label_issues(
    features: Mapping[str, Features], classes: Sequence[str], seed: int
) -> tuple[tuple[LabelIssue, ...], str, dict[str, float]]:
    train = features["train"]
    folds = min(_FOLDS, int(np.bincount(train.labels, minlength=len(classes)).min()))
    if folds < 2:
        return (), "skipped: a class has fewer than 2 training images", {}
    components = min(_PROBE_COMPONENTS, len(train.labels) - 1, train.embeddings.shape[1])
    pca = PCA(components, random_state=seed).fit(train.embeddings)
    fit = fit_logistic_regression(
        pca.transform(train.embeddings).astype(np.float32),
        train.labels,
        classes=classes,
        c_grid=_PROBE_C,
        folds=folds,
        seed=seed,
    )
    if fit.oof_logits is None:
        return (), "skipped: no cross-validation folds", {}
    scored = {"train": softmax(fit.oof_logits)}
    for split, held in features.items():
        if split != "train" and len(held.labels):
            reduced = pca.transform(held.embeddings).astype(np.float32)
            scored[split] = softmax(head_logits(fit.linear, reduced))
    finder, method = _finder()
    issues: list[LabelIssue] = []
    accuracy: dict[str, float] = {}
    for split, probabilities in scored.items():
        labels = features[split].labels
        accuracy[split] = float((probabilities.argmax(axis=1) == labels).mean())
        for i in finder(labels, probabilities):
            row = probabilities[i]
            issues.append(
                LabelIssue(
                    path=str(features[split].paths[i]),
                    split=split,
                    given=classes[int(labels[i])],
                    predicted=classes[int(row.argmax())],
                    given_probability=round(float(row[labels[i]]), 6),
                    predicted_probability=round(float(row.max()), 6),
                )
            )
    issues.sort(key=lambda issue: issue.given_probability)
    how = f"{method} on out-of-fold probabilities of a logistic regression (C={fit.c:g})"
    return tuple(issues), f"{how} on {components} principal components", accuracy


def _finder() -> tuple[Any, str]:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return confident_learning, "confident learning (tlserve's)"

    def find(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        # Every class must appear among the given labels for cleanlab; a split
        # that lacks one is checked with the same rule, implemented here.
        if len(np.unique(labels)) < probabilities.shape[1]:
            return confident_learning(labels, probabilities)
        with warnings.catch_warnings():
            # Classes of a handful of images: cleanlab says it may miss some there.
            warnings.filterwarnings("ignore", message="May not flag all label issues")
            found: np.ndarray = find_label_issues(
                labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
            )
        return found

    return find, "cleanlab find_label_issues"


def confident_learning(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Confident learning's rule (Northcutt et al. 2021), most suspect first.

    Each class's threshold is the mean probability the probe gives it on the
    images labelled with it; an image is suspect when the most probable class
    whose threshold it reaches is not its given one.
    """
    n_classes = probabilities.shape[1]
    thresholds = np.array(
        [
            probabilities[labels == c, c].mean() if np.any(labels == c) else 1.0
            for c in range(n_classes)
        ]
    )
    above = np.where(probabilities >= thresholds, probabilities, -1.0)
    confident = above.argmax(axis=1)
    suspect = np.flatnonzero((above.max(axis=1) >= 0) & (confident != labels))
    order = np.argsort(probabilities[suspect, labels[suspect]], kind="stable")
    ranked: np.ndarray = suspect[order]
    return ranked


def near_duplicates(
    features: Mapping[str, Features], similarity: float = DUPLICATE_SIMILARITY
) -> tuple[DuplicatePair, ...]:
    """Pairs of images whose unit embeddings' dot product is at least ``similarity``.

    Leaks (pairs across splits) first, then by similarity, highest first.
    """
    splits = [split for split, f in features.items() for _ in f.paths]
    paths = [str(path) for f in features.values() for path in f.paths]
    if not paths:
        return ()
    x = np.concatenate([f.embeddings for f in features.values()]).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pairs = []
    for start in range(0, len(x), _CHUNK):
        block = x[start : start + _CHUNK] @ x.T
        rows, cols = np.nonzero(block >= similarity)
        for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + row
            if col > i:  # each pair once, never an image with itself
                pairs.append(
                    DuplicatePair(paths[i], paths[col], splits[i], splits[col],
                                  round(float(block[row, col]), 6))
                )  # fmt: skip
    pairs.sort(key=lambda pair: (not pair.leak, -pair.similarity))
    return tuple(pairs)


def without_duplicates(
    splits: Mapping[str, list[Sample]], pairs: Sequence[DuplicatePair]
) -> tuple[dict[str, list[Sample]], list[str]]:
    """The splits less one image of each duplicate pair, and the paths dropped.

    A leak drops the training copy (held-out images stay as they are); a
    pair within a split drops its second image.
    """
    dropped: set[str] = set()
    for pair in pairs:
        if pair.a in dropped or pair.b in dropped:
            continue
        if pair.leak and pair.split_a == "train":
            dropped.add(pair.a)
        else:
            dropped.add(pair.b)
    kept = {
        split: [s for s in samples if str(s[0]) not in dropped] for split, samples in splits.items()
    }
    for line in sorted(dropped):
        log.info("dropping near-duplicate %s", line)
    return kept, sorted(dropped)
