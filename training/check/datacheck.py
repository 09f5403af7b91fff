"""Know your data before training on it: label issues, near-duplicates, leaks, imbalance.

All from the frozen backbone's embeddings, which training computes anyway:

- **likely label issues**: the cheap probe (logistic regression on the
  embeddings, :mod:`~tlserve.training.fit.strategies.linear`) scores every
  training image out of fold, and val/test images with the probe fitted on
  train; cleanlab's confident learning (``find_label_issues``) names the
  images whose given label the probe confidently disagrees with. Without
  cleanlab the same rule is applied here (:func:`confident_learning`).
- **near-duplicates**: pairs whose embeddings have cosine similarity of at
  least :data:`DUPLICATE_SIMILARITY`; a pair across train and val/test is a
  **leak** (it inflates the held-out figures).
- per-class counts and the **imbalance** ratio, and the **unreadable** files.

Nothing is changed: the check reports (``report.json``'s ``data_check``
lists suspects by path) and :func:`without_duplicates` drops only when asked
(``tlserve train --drop-duplicates``). The search itself is in
:mod:`~tlserve.training.check.suspects`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlserve.training.backbone.backbones import DEFAULT_BACKBONE
from tlserve.training.check.suspects import (
    DUPLICATE_SIMILARITY,
    DuplicatePair,
    LabelIssue,
    confident_learning,
    label_issues,
    near_duplicates,
    without_duplicates,
)
from tlserve.training.features.extract import Features, SkippedFile
from tlserve.training.fit.strategies.base import FitContext

__all__ = [
    "DUPLICATE_SIMILARITY",
    "DataCheck",
    "DuplicatePair",
    "LabelIssue",
    "check_before_training",
    "check_data",
    "check_folder",
    "confident_learning",
    "without_duplicates",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataCheck:
    """What the check found; :meth:`findings` says it in one line each."""

    n_images: int
    counts: Mapping[str, Mapping[str, int]]
    imbalance: float  # largest over smallest training class
    label_issues: tuple[LabelIssue, ...] = ()
    duplicates: tuple[DuplicatePair, ...] = ()
    unreadable: tuple[SkippedFile, ...] = ()
    method: str = ""
    probe_accuracy: Mapping[str, float] = field(default_factory=dict)

    @property
    def leaks(self) -> tuple[DuplicatePair, ...]:
        return tuple(pair for pair in self.duplicates if pair.leak)

    def findings(self, where: str = "report.md (Data check)") -> list[str]:
        """One line per finding: what, how many, where to look."""
        lines = []
        if self.label_issues:
            by_split = _count(issue.split for issue in self.label_issues)
            lines.append(
                f"data check: {len(self.label_issues)} likely label issues ({by_split}); "
                f"thumbnails in {where}, paths in data_check.label_issues"
            )
        if self.leaks:
            lines.append(
                f"data check: {len(self.leaks)} near-duplicates straddle train and held-out "
                f"images (a leak: held-out figures are inflated); pairs in data_check.duplicates"
            )
        inside = len(self.duplicates) - len(self.leaks)
        if inside:
            lines.append(
                f"data check: {inside} near-duplicate pairs within a split; "
                "pairs in data_check.duplicates (--drop-duplicates drops the copies)"
            )
        if self.imbalance >= 2.0:
            train = self.counts.get("train", {})
            low, high = min(train, key=train.__getitem__), max(train, key=train.__getitem__)
            lines.append(
                f"data check: classes imbalanced {self.imbalance:.1f}:1 "
                f"({high} {train[high]}, {low} {train[low]} training images)"
            )
        if self.unreadable:
            lines.append(
                f"data check: {len(self.unreadable)} unreadable files skipped, "
                f"e.g. {self.unreadable[0].path}; all in data_check.unreadable"
            )
        return lines

    def summary(self) -> str:
        """The one-line summary (``make demo`` prints it)."""
        return (
            f"data check of {self.n_images} images: {len(self.label_issues)} likely label "
            f"issues, {len(self.duplicates)} near-duplicate pairs ({len(self.leaks)} leaks "
            f"across splits), imbalance {self.imbalance:.1f}:1, {len(self.unreadable)} unreadable"
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``report.json`` holds under ``data_check``: every suspect by path."""
        return {
            "summary": self.summary(),
            "findings": self.findings(),
            "method": self.method,
            "duplicate_similarity": DUPLICATE_SIMILARITY,
            "n_images": self.n_images,
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "imbalance": self.imbalance,
            "probe_accuracy": dict(self.probe_accuracy),
            "label_issues": [asdict(issue) for issue in self.label_issues],
            "duplicates": [{**asdict(pair), "leak": pair.leak} for pair in self.duplicates],
            "unreadable": [{"path": str(s.path), "reason": s.reason} for s in self.unreadable],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataCheck:
        """Read :meth:`to_dict`'s output back; the summary and findings follow from the rest."""
        pair_fields = ("a", "b", "split_a", "split_b", "similarity")
        return cls(
            n_images=int(data["n_images"]),
            counts={str(k): dict(v) for k, v in data.get("counts", {}).items()},
            imbalance=float(data.get("imbalance", 1.0)),
            label_issues=tuple(LabelIssue(**issue) for issue in data.get("label_issues", [])),
            duplicates=tuple(
                DuplicatePair(**{k: pair[k] for k in pair_fields})
                for pair in data.get("duplicates", [])
            ),
            unreadable=tuple(
                SkippedFile(Path(s["path"]), str(s["reason"])) for s in data.get("unreadable", [])
            ),
            method=str(data.get("method", "")),
            probe_accuracy=dict(data.get("probe_accuracy", {})),
        )


def _count(items: Any) -> str:
    found: dict[str, int] = {}
    for item in items:
        found[item] = found.get(item, 0) + 1
    return ", ".join(f"{n} in {k}" for k, n in found.items())


def check_data(
    features: Mapping[str, Features],
    classes: Sequence[str],
    *,
    seed: int = 0,
    similarity: float = DUPLICATE_SIMILARITY,
) -> DataCheck:
    """Check the splits' embeddings (``train`` required; ``val``/``test`` if present)."""
    counts = {
        split: dict(
            zip(classes, np.bincount(f.labels, minlength=len(classes)).tolist(), strict=True)
        )
        for split, f in features.items()
    }
    train_counts = np.array(list(counts["train"].values()))
    imbalance = float(train_counts.max() / max(1, train_counts.min()))
    issues, method, accuracy = label_issues(features, classes, seed)
    unreadable = tuple(s for f in features.values() for s in f.skipped)
    check = DataCheck(
        n_images=sum(len(f.labels) for f in features.values()),
        counts=counts,
        imbalance=imbalance,
        label_issues=issues,
        duplicates=near_duplicates(features, similarity),
        unreadable=unreadable,
        method=method,
        probe_accuracy=accuracy,
    )
    return check


def check_before_training(
    context: FitContext, *, seed: int = 0, drop_duplicates: bool = False
) -> tuple[DataCheck, FitContext]:
    """Check the context's splits (frozen features, cached for training), log one line a finding.

    Returns the check and the context to train with: the same one, or with
    ``drop_duplicates`` one whose splits lack one image of each near-duplicate
    pair (:func:`without_duplicates`; its features are the ones already
    computed, less those rows). Nothing else is ever changed or dropped.
    """
    features = {
        split: context.features(split) for split, samples in context.splits.items() if samples
    }
    check = check_data(features, context.classes, seed=seed)
    log.info("%s", check.summary())
    for line in check.findings():
        log.warning("%s", line)
    if not (drop_duplicates and check.duplicates):
        return check, context
    kept, dropped = without_duplicates(context.splits, check.duplicates)
    gone = set(dropped)
    cached = {key: _without(found, gone) for key, found in context._cache.items()}
    log.warning("data check: dropped %d near-duplicates (--drop-duplicates)", len(dropped))
    return check, dataclasses.replace(context, splits=kept, _cache=cached)


def _without(features: Features, gone: set[str]) -> Features:
    keep = np.array([str(path) not in gone for path in features.paths], dtype=bool)
    return Features(
        features.embeddings[keep],
        features.labels[keep],
        tuple(p for p, k in zip(features.paths, keep, strict=True) if k),
        features.skipped,
    )


def check_folder(
    data_dir: Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    seed: int = 0,
    test_fraction: float = 0.2,
    batch_size: int = 32,
    workers: int | None = None,
    cache_dir: Path | None = None,
) -> DataCheck:
    """``tlserve check DATA_DIR``: the same check, without training."""
    from tlserve.training.backbone.backbones import create_backbone
    from tlserve.training.data.folders import load_dataset
    from tlserve.training.features.cache import default_cache_dir

    dataset = load_dataset(Path(data_dir), seed=seed, test_fraction=test_fraction)
    context = FitContext(
        classes=dataset.classes,
        backbone=create_backbone(backbone),
        splits=dataset.splits(),
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        cache_dir=cache_dir or default_cache_dir(),
    )
    return check_before_training(context, seed=seed)[0]
