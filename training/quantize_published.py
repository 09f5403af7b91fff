"""``tlserve quantize REPO/NAME/VERSION``: faster variants of a published model, published next.

Versions are immutable (a server may be serving this one), so the result is
published as the next version of the same model, beside its report files,
after the same measurement as at training time
(:func:`~tlserve.training.artifact.requantize.build_for_dataset`). The images
come from the folder the version was trained on (its run record,
``report.json``), or ``data_dir``. A pipeline like :mod:`~tlserve.training.train`,
so it sits above the stages: it reads the report stage's record and writes
the artifact stage's variants.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import onnx

from tlserve.contract.card import ModelCard
from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import MODEL_FILE, valid_model_name
from tlserve.contract.variants import DEFAULT_BUDGET_POINTS, REFERENCE_FILE, VARIANTS, variant_file
from tlserve.training.artifact.publish import publish
from tlserve.training.artifact.quantize import VariantReport
from tlserve.training.artifact.requantize import build_for_dataset
from tlserve.training.data.folders import load_dataset
from tlserve.training.report.record import REPORT_FILENAME, RunRecord
from tlserve.training.report.variant_section import VariantsRecord

__all__ = ["quantize_published"]

log = logging.getLogger(__name__)

_MODEL_FILES = {variant_file(v) for v in VARIANTS} | {REFERENCE_FILE}


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
    report_path = version_dir / REPORT_FILENAME
    record = RunRecord.load(report_path) if report_path.is_file() else None
    root = data_dir or (record.data.root if record else None)
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
        if record:
            variant = VariantsRecord.from_report(made)
            extras[REPORT_FILENAME] = replace(
                record, variant=variant, quantized_from=str(version_dir)
            ).to_json()
        published = publish(model, version_dir.parent.parent, version_dir.parent.name, extras)
    return published, made
