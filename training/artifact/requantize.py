"""Faster variants checked on a dataset: at training time, and for published models.

:func:`build_for_dataset` draws the calibration images stratified from the
training split, the reference set (:func:`reference_set`) from the held-out
split, and scores on the held-out split; training calls it on the file it just
exported.

``tlserve quantize REPO/NAME/VERSION`` runs the same on a published version
(:mod:`~tlserve.training.quantize_published`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlserve.contract.card import Preprocessing
from tlserve.contract.errors import InvalidInput
from tlserve.contract.images import prepare_image
from tlserve.contract.variants import (
    DEFAULT_BUDGET_POINTS,
    REFERENCE_FILE,
    REFERENCE_IMAGES,
    ReferenceSet,
    min_reference_images,
    variant_file,
)
from tlserve.training.artifact.quantize import VariantReport, build_variants
from tlserve.training.artifact.variants import HeldOut, load_session, probabilities
from tlserve.training.data.folders import Dataset

__all__ = [
    "CALIBRATION_IMAGES",
    "build_for_dataset",
    "load_labelled",
    "reference_set",
    "stratified",
]

log = logging.getLogger(__name__)

# A few hundred images pin the activation ranges; more adds calibration time
# (one forward pass each) without moving MinMax ranges much.
CALIBRATION_IMAGES = 256


def stratified(samples: Sequence[tuple[Path, int]], limit: int, seed: int = 0) -> list[Path]:
    """Up to ``limit`` paths, the same share from every class (round-robin over shuffled ones)."""
    by_class: dict[int, list[Path]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    rng = random.Random(seed)
    for paths in by_class.values():
        rng.shuffle(paths)
    picked: list[Path] = []
    queues = [by_class[label] for label in sorted(by_class)]
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    return picked


def load_labelled(
    samples: Sequence[tuple[Path, int]], spec: Preprocessing
) -> tuple[np.ndarray, np.ndarray]:
    """Every readable image as the model's uint8 input, with its label; unreadable ones skipped."""
    rows, labels = [], []
    for path, label in samples:
        try:
            rows.append(prepare_image(path, spec))
        except (InvalidInput, OSError):
            continue
        labels.append(label)
    if not rows:
        raise InvalidInput("none of the images to check a model variant on could be read")
    return np.stack(rows), np.asarray(labels, dtype=np.int64)


def reference_set(
    exported: Path,
    dataset: Dataset,
    spec: Preprocessing,
    *,
    seed: int = 0,
    budget_points: float = DEFAULT_BUDGET_POINTS,
) -> ReferenceSet:
    """Up to :data:`REFERENCE_IMAGES` labelled inputs with ``exported``'s probabilities on them.

    Held-out images (test, else val) first, stratified by class; when there are
    too few of them to resolve ``budget_points``, training images fill the set up.
    """
    held_out = _labelled(dataset.test or dataset.val, REFERENCE_IMAGES, seed)
    fill: list[tuple[Path, int]] = []
    if len(held_out) < min_reference_images(budget_points):
        fill = _labelled(dataset.train, REFERENCE_IMAGES - len(held_out), seed)
    images, labels = load_labelled(held_out, spec)
    held = len(labels)  # readable held-out images
    if fill:
        more, more_labels = load_labelled(fill, spec)
        images, labels = np.concatenate([images, more]), np.concatenate([labels, more_labels])
    answers = probabilities(load_session(exported), images)
    return ReferenceSet(images, labels, answers, held_out=held)


def _labelled(samples: Sequence[tuple[Path, int]], limit: int, seed: int) -> list[tuple[Path, int]]:
    """:func:`stratified` with each path's label."""
    label_of = dict(samples)
    return [(path, label_of[path]) for path in stratified(samples, limit, seed)]


def build_for_dataset(
    exported: Path,
    dataset: Dataset,
    spec: Preprocessing,
    *,
    mode: str = "auto",
    seed: int = 0,
    budget_points: float = DEFAULT_BUDGET_POINTS,
) -> tuple[VariantReport | None, dict[str, bytes]]:
    """:func:`build_variants` with calibration images drawn stratified from
    ``dataset.train``, the reference set from :func:`reference_set` and the held-out
    figures on ``dataset.test`` (else ``val``).

    Returns the report and the files to publish beside ``exported`` (the variants
    that passed, and ``reference.npz``); none when ``mode`` is ``none``.
    """
    if mode == "none":
        return None, {}
    calibration, _ = load_labelled(
        [(p, 0) for p in stratified(dataset.train, CALIBRATION_IMAGES, seed)], spec
    )
    scored = dataset.test or dataset.val
    held_out = HeldOut(*load_labelled(scored, spec)) if scored else None
    reference = reference_set(exported, dataset, spec, seed=seed, budget_points=budget_points)
    report = build_variants(
        exported, calibration, reference, held_out, mode=mode, budget_points=budget_points
    )
    files = {REFERENCE_FILE: reference.to_bytes()}
    for variant in report.published if report else ():
        files[variant_file(variant)] = exported.with_name(variant_file(variant)).read_bytes()
    return report, files
