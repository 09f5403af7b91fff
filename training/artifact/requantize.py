"""Faster variants checked on a dataset: at training time, and for published models.

:func:`build_for_dataset` draws the calibration images stratified from the
training split, the reference set (:func:`reference_set`) from the held-out
split, and scores on the held-out split; training calls it on the file it just
exported.

``tlserve quantize REPO/NAME/VERSION`` (:func:`quantize_published`): versions
are immutable (a server may be serving this one), so the result is published
as the next version of the same model, beside its report files, after the
same measurement as at training time. The images come from the folder the
version was trained on (``report.json``), or ``data_dir``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from tlserve.contract.card import ModelCard, Preprocessing
from tlserve.contract.errors import InvalidInput
from tlserve.contract.images import prepare_image
from tlserve.contract.rules import MODEL_FILE, valid_model_name
from tlserve.contract.variants import (
    DEFAULT_BUDGET_POINTS,
    REFERENCE_FILE,
    REFERENCE_IMAGES,
    VARIANTS,
    ReferenceSet,
    min_reference_images,
    variant_file,
)
from tlserve.training.artifact.publish import publish
from tlserve.training.artifact.quantize import VariantReport, build_variants
from tlserve.training.artifact.variants import HeldOut, load_session, probabilities
from tlserve.training.data.folders import Dataset, load_dataset

__all__ = [
    "CALIBRATION_IMAGES",
    "build_for_dataset",
    "load_labelled",
    "quantize_published",
    "reference_set",
    "stratified",
]

log = logging.getLogger(__name__)

_REPORT = "report.json"
_MODEL_FILES = {variant_file(v) for v in VARIANTS} | {REFERENCE_FILE}
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


def quantize_published(
    version_dir: Path,
    *,
    data_dir: Path | None = None,
    mode: str = "auto",
    budget_points: float = DEFAULT_BUDGET_POINTS,
    test_fraction: float = 0.2,
) -> tuple[Path, VariantReport]:
    """Make and check variants of ``version_dir``'s model; publish them beside a copy of
    it, with a reference set, as the next version.

    Returns the new version directory and the report. ``mode`` is ``int8``,
    ``fp16`` or ``auto`` (see :func:`tlserve.training.artifact.quantize.build_variants`).
    """
    version_dir = Path(version_dir)
    source = version_dir / MODEL_FILE
    if not source.is_file():
        raise InvalidInput(f"no {MODEL_FILE} in {version_dir}: give REPO/NAME/VERSION")
    if mode not in ("int8", "fp16", "auto"):
        raise InvalidInput(f"variant must be int8, fp16 or auto, got {mode!r}")
    props = {
        p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props
    }
    card = ModelCard.from_props(props)
    if card is None:
        raise InvalidInput(f"{source} carries no tlserve model card (labels, preprocessing)")
    if card.notes.get("variant", "float32") != "float32":
        raise InvalidInput(
            f"{source} is already the {card.notes['variant']} variant; quantize a float32 version"
        )
    report_path = version_dir / _REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    root = data_dir or report.get("data", {}).get("root")
    if not root:
        raise InvalidInput(
            f"{version_dir} does not say which images it was trained on; pass --data"
        )
    dataset = load_dataset(
        Path(root), seed=int(card.notes.get("seed", 0)), test_fraction=test_fraction
    )
    if dataset.classes != card.labels:
        raise InvalidInput(
            f"the images in {root} have classes {list(dataset.classes)}, the model "
            f"{list(card.labels)}"
        )
    if card.data_fingerprint and dataset.fingerprint() != card.data_fingerprint:
        log.warning(
            "%s changed since %s was trained: the held-out figures use today's", root, source
        )
    with tempfile.TemporaryDirectory(prefix="tlserve-requantize-") as tmp:
        model = Path(tmp) / MODEL_FILE
        shutil.copyfile(source, model)
        made, files = build_for_dataset(
            model,
            dataset,
            card.preprocessing,
            mode=mode,
            seed=int(card.notes.get("seed", 0)),
            budget_points=budget_points,
        )
        assert made is not None  # mode is never "none" here
        extras = {
            f.name: f.read_bytes()
            for f in sorted(version_dir.iterdir())
            if f.is_file() and f.name not in _MODEL_FILES and valid_model_name(f.name)
        }
        extras.update(files)
        if report:
            report["variant"] = made.to_dict()
            report["quantized_from"] = str(version_dir)
            extras[_REPORT] = json.dumps(report, indent=2, default=str).encode()
        published = publish(model, version_dir.parent.parent, version_dir.parent.name, extras)
    return published, made
