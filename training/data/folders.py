"""Find the labelled images of a training run.

Two layouts are accepted, both torchvision's ``ImageFolder`` convention::

    root/train/<class>/*.png   (+ optional root/val/<class>/..., root/test/<class>/...)
    root/<class>/*.png         (no train/: a stratified train/test split is made)

When there is a ``train/`` but no ``test/``, ``train/`` is split the same way.
Class names are the sorted folder names under ``train/`` (or ``root``); their
position is the label index. Hidden files and folders (``.name``) are ignored,
class folders are searched recursively, and the suffix check is case-insensitive.

Images are only listed here, not decoded: an unreadable file is found, reported
and skipped when features are computed (:mod:`tlserve.training.features.extract`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tlserve.contract.errors import DataError
from tlserve.contract.rules import IMAGE_SUFFIXES

__all__ = ["DataError", "Dataset", "Sample", "load_dataset", "split_samples"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

Sample = tuple[Path, int]
"""One labelled image: its path and the index of its class in ``Dataset.classes``."""


@dataclass(frozen=True)
class Dataset:
    """The labelled images of one training run, split three ways.

    ``held_out`` says where ``test`` came from: a ``test/`` folder (``"test"``)
    or a stratified split of the training images (``"split"``). ``val`` and
    ``test`` may be empty.
    """

    root: Path
    classes: tuple[str, ...]
    train: list[Sample]
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    held_out: Literal["test", "split"] = "split"

    def splits(self) -> dict[str, list[Sample]]:
        """The non-empty splits by name."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: samples for name, samples in named.items() if samples}

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each non-empty split, for reports."""
        result: dict[str, dict[str, int]] = {}
        for name, samples in self.splits().items():
            per_class = dict.fromkeys(self.classes, 0)
            for _, label in samples:
                per_class[self.classes[label]] += 1
            result[name] = per_class
        return result

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over every image's path (relative to root) and size.

        Cheap (no file is read) and enough to tell whether two models were
        trained on the same files; split membership is part of it.
        """
        digest = hashlib.sha256()
        for split, samples in (("train", self.train), ("val", self.val), ("test", self.test)):
            for path, label in sorted(samples):
                relative = path.relative_to(self.root).as_posix()
                digest.update(f"{split}\t{relative}\t{label}\t{path.stat().st_size}\n".encode())
        return "sha256:" + digest.hexdigest()


def load_dataset(root: Path, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """List the images under ``root`` (see the module docstring for the layouts).

    ``seed`` and ``test_fraction`` shape the stratified split made when there is
    no ``test/`` folder: each class gives ``round(n * test_fraction)`` images (at
    least one, and never all of them) to ``test``. Raises :class:`DataError`.
    """
    root = Path(root)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    train_dir = root / "train"
    if not train_dir.is_dir():
        present = [name for name in ("val", "test") if (root / name).is_dir()]
        if present:
            raise DataError(f"{root} has {present[0]}/ but no train/ folder")
        classes, by_class = _scan_classes(root)
        train, test = _stratified_split(by_class, test_fraction, seed)
        log.info("no train/ in %s: split %d images stratified into train/test", root, len(train))
        return Dataset(root, classes, train, [], test, held_out="split")

    classes, by_class = _scan_classes(train_dir)
    val = _scan_extra(root / "val", classes) if (root / "val").is_dir() else []
    if (root / "test").is_dir():
        train = [sample for samples in by_class for sample in samples]
        test = _scan_extra(root / "test", classes)
        return Dataset(root, classes, train, val, test, held_out="test")
    train, test = _stratified_split(by_class, test_fraction, seed)
    log.info("no test/ in %s: held out a stratified %.0f%% of train/", root, 100 * test_fraction)
    return Dataset(root, classes, train, val, test, held_out="split")


def split_samples(
    samples: Sequence[Sample], fraction: float, *, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """A stratified (train, val) split of ``samples``, ``fraction`` of each class to val.

    For strategies that need validation images when there is no ``val/``
    folder. Classes with fewer than five images give nothing (they need every
    image to train).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample[1], []).append(sample)
    groups = [by_label[label] for label in sorted(by_label)]
    large = [group for group in groups if len(group) >= 5]
    train, val = _stratified_split(large, fraction, seed) if large else ([], [])
    train += [sample for group in groups if len(group) < 5 for sample in group]
    return sorted(train, key=lambda s: (s[1], s[0])), val


def _scan_classes(directory: Path) -> tuple[tuple[str, ...], list[list[Sample]]]:
    """Class names (sorted folder names) and each class's images, labelled."""
    classes = tuple(sorted(child.name for child in _visible_dirs(directory)))
    if not classes:
        raise DataError(
            f"no class folders in {directory}: expected {directory}/<class>/<image> with "
            f"images ending in {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if len(classes) == 1:
        raise DataError(
            f"only one class ({classes[0]!r}) in {directory}: a classifier needs at least two"
        )
    by_class: list[list[Sample]] = []
    for label, name in enumerate(classes):
        images = sorted(_images(directory / name))
        if not images:
            raise DataError(
                f"class folder {name!r} in {directory} holds no images "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        by_class.append([(path, label) for path in images])
    return classes, by_class


def _scan_extra(directory: Path, classes: Sequence[str]) -> list[Sample]:
    """The images of a val/ or test/ folder, labelled with train's classes."""
    samples: list[Sample] = []
    index = {name: label for label, name in enumerate(classes)}
    for child in sorted(_visible_dirs(directory), key=lambda p: p.name):
        if child.name not in index:
            raise DataError(
                f"{directory.name}/ has class {child.name!r} which train/ lacks "
                f"(train classes: {', '.join(classes)})"
            )
        samples.extend((path, index[child.name]) for path in sorted(_images(child)))
    if not samples:
        raise DataError(f"{directory} exists but holds no images")
    return samples


def _stratified_split(
    by_class: Sequence[Sequence[Sample]], test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    test: list[Sample] = []
    for samples in by_class:
        n = len(samples)
        n_test = min(max(round(n * test_fraction), 1), n - 1)
        if n_test < 1:
            path, label = samples[0]
            log.warning("class %d has a single image (%s): it stays in train", label, path)
        order = rng.permutation(n)
        test.extend(samples[i] for i in sorted(order[:n_test]))
        train.extend(samples[i] for i in sorted(order[n_test:]))
    return train, test


def _visible_dirs(directory: Path) -> Iterator[Path]:
    return (c for c in directory.iterdir() if c.is_dir() and not c.name.startswith("."))


def _images(directory: Path) -> Iterator[Path]:
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path
