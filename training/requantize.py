"""Faster variants checked on a dataset: at training time, and for published models.

:func:`select_for_dataset` draws the calibration images stratified from the
training split and scores on the held-out split; training calls it through
:func:`variant_report` on the file it just exported.

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
from tlserve.training.data import Dataset, load_dataset
from tlserve.training.publish import publish
from tlserve.training.quantize import (
    DEFAULT_BUDGET_POINTS,
    DEFAULT_MIN_SPEEDUP,
    Decision,
    select_variant,
)
from tlserve.training.variants import HeldOut

__all__ = [
    "CALIBRATION_IMAGES",
    "load_labelled",
    "quantize_published",
    "select_for_dataset",
    "stratified",
    "variant_report",
]

log = logging.getLogger(__name__)

_REPORT = "report.json"
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


def select_for_dataset(
    exported: Path,
    dataset: Dataset,
    spec: Preprocessing,
    *,
    mode: str = "auto",
    seed: int = 0,
    budget_points: float = DEFAULT_BUDGET_POINTS,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
) -> Decision | None:
    """:func:`select_variant` with calibration images drawn stratified from ``dataset.train``
    and the held-out check on ``dataset.test`` (else ``val``)."""
    if mode == "none":
        return None
    calibration, _ = load_labelled(
        [(p, 0) for p in stratified(dataset.train, CALIBRATION_IMAGES, seed)], spec
    )
    scored = dataset.test or dataset.val
    held_out = HeldOut(*load_labelled(scored, spec)) if scored else None
    return select_variant(
        exported,
        calibration,
        held_out,
        mode=mode,
        budget_points=budget_points,
        min_speedup=min_speedup,
    )


def variant_report(
    exported: Path, dataset: Dataset, spec: Preprocessing, *, mode: str = "auto", seed: int = 0
) -> dict[str, object] | None:
    """The training hook: :func:`select_for_dataset` on the file just exported, as the
    ``variant`` entry of report.json (None when ``mode`` is ``none``)."""
    decision = select_for_dataset(exported, dataset, spec, mode=mode, seed=seed)
    return decision.to_dict() if decision else None


def quantize_published(
    version_dir: Path,
    *,
    data_dir: Path | None = None,
    mode: str = "auto",
    budget_points: float = DEFAULT_BUDGET_POINTS,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    test_fraction: float = 0.2,
) -> tuple[Path, Decision]:
    """Measure a variant of ``version_dir``'s model and publish the chosen one as a new version.

    Returns the new version directory and the decision. ``mode`` is
    ``int8``, ``fp16`` or ``auto`` (see :func:`select_variant`).
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
        decision = select_for_dataset(
            model,
            dataset,
            card.preprocessing,
            mode=mode,
            seed=int(card.notes.get("seed", 0)),
            budget_points=budget_points,
            min_speedup=min_speedup,
        )
        assert decision is not None  # mode is never "none" here
        extras = {
            f.name: f.read_bytes()
            for f in sorted(version_dir.iterdir())
            if f.is_file() and f.name != MODEL_FILE and valid_model_name(f.name)
        }
        if report:
            report["variant"] = decision.to_dict()
            report["quantized_from"] = str(version_dir)
            extras[_REPORT] = json.dumps(report, indent=2, default=str).encode()
        published = publish(model, version_dir.parent.parent, version_dir.parent.name, extras)
    return published, decision
