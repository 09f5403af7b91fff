"""One training run, end to end: data → backbone → strategy → evaluate → export → publish."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tlserve.client.metadata import ModelCard
from tlserve.training.backbones import create_backbone
from tlserve.training.data import load_dataset
from tlserve.training.evaluate import Evaluation, evaluate
from tlserve.training.export import export_onnx
from tlserve.training.features import Features, SkippedFile, extract_features, load_images
from tlserve.training.modules import ImageEmbedder
from tlserve.training.publish import MODEL_FILENAME, publish, validate_model_name
from tlserve.training.strategies import FitContext, FittedHead, create_strategy

__all__ = ["REPORT_FILENAME", "TrainResult", "train"]

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"
_EXPORT_SAMPLE_IMAGES = 8


@dataclass(frozen=True)
class TrainResult:
    """What a training run published and how good it is.

    ``held_out`` says what ``test_accuracy`` was measured on: the ``test/``
    folder (``"test"``) or a stratified split of the training images
    (``"split"``). ``params`` are the strategy's choices (for ``linear``:
    ``C``, ``folds``, ``cv_accuracy``).
    """

    name: str
    version: int
    version_dir: Path
    model_path: Path
    classes: tuple[str, ...]
    backbone: str
    strategy: str
    held_out: Literal["test", "split"]
    n_train: int
    n_test: int
    test_accuracy: float | None
    val_accuracy: float | None
    params: Mapping[str, float | int | str]
    skipped: tuple[SkippedFile, ...]
    card: ModelCard
    wall_seconds: float

    def summary(self) -> str:
        """A few lines for a person: accuracy, where the model went, what was skipped."""
        where = "test/" if self.held_out == "test" else "a held-out split"
        accuracy = "n/a" if self.test_accuracy is None else f"{self.test_accuracy:.1%}"
        lines = [
            f"held-out accuracy on {where}: {accuracy} ({self.n_test} images, "
            f"{len(self.classes)} classes; trained on {self.n_train})",
            f"strategy {self.strategy} on {self.backbone}: "
            + ", ".join(f"{k}={v}" for k, v in self.params.items()),
            f"published {self.name} version {self.version}: {self.model_path}",
            f"wall time {self.wall_seconds:.0f} s",
        ]
        if self.val_accuracy is not None:
            lines.insert(1, f"validation accuracy: {self.val_accuracy:.1%}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable files, e.g. {self.skipped[0]}")
        return "\n".join(lines)


def train(
    data_dir: Path,
    *,
    model_repository: Path,
    name: str,
    strategy: str = "linear",
    backbone: str = "tf_efficientnet_lite0",
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    backbone_weights: Path | None = None,
    test_fraction: float = 0.2,
) -> TrainResult:
    """Train a classifier on the images in ``data_dir`` and publish it as ``name``.

    The new version lands in ``<model_repository>/<name>/<version>/`` with
    ``model.onnx`` (labels, preprocessing, metrics and provenance in its
    metadata) and ``report.json``. ``workers`` is the number of image
    decoding processes (0: none, None: one per CPU). Raises
    :class:`~tlserve.training.data.DataError` for unusable data and
    :class:`~tlserve.training.export.ExportError` if the export fails to verify.
    """
    start = time.perf_counter()
    validate_model_name(name)  # before minutes of work, not after
    _seed_everything(seed)
    dataset = load_dataset(Path(data_dir), seed=seed, test_fraction=test_fraction)
    log.info("data %s: %d classes, %s", data_dir, len(dataset.classes), dataset.counts())
    chosen = create_strategy(strategy)
    net = create_backbone(backbone, weights=backbone_weights)
    context = FitContext(
        classes=dataset.classes,
        embedder=ImageEmbedder.from_backbone(net),
        splits=dataset.splits(),
        seed=seed,
        batch_size=batch_size,
        workers=workers,
    )
    fitted = chosen.fit(context)
    held_out = {split: _evaluate(context, fitted, split) for split in ("val", "test")}
    test, val = held_out["test"], held_out["val"]
    if test is not None:
        log.info("%s accuracy %.4f on %d held-out images", strategy, test.accuracy, test.n)

    metrics: dict[str, float] = {}
    for split, evaluation in held_out.items():
        if evaluation is not None:
            metrics[f"{split}_accuracy"] = evaluation.accuracy
            metrics[f"{split}_expected_calibration_error"] = evaluation.expected_calibration_error
    n_train = len(context.features("train").labels)
    card = ModelCard(
        labels=dataset.classes,
        preprocessing=fitted.embedder.preprocessing,
        backbone=net.name,
        strategy=chosen.name,
        metrics=metrics,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data_fingerprint=dataset.fingerprint(),
        tlserve_version=_tlserve_version(),
        notes={
            "held_out": dataset.held_out,
            "n_train": str(n_train),
            "n_test": str(test.n if test else 0),
            "seed": str(seed),
            **{key: str(value) for key, value in fitted.params.items()},
        },
    )
    skipped = _skipped(context)
    sample_paths = [path for path, _ in dataset.test + dataset.train]
    samples = load_images(sample_paths, card.preprocessing, limit=_EXPORT_SAMPLE_IMAGES)
    with tempfile.TemporaryDirectory(prefix="tlserve-export-") as tmp:
        exported = Path(tmp) / MODEL_FILENAME
        check = export_onnx(fitted.embedder, fitted.head, card, exported, samples)
        report = {
            "name": name,
            "card": asdict(card),
            "params": dict(fitted.params),
            "data": {
                "root": str(dataset.root),
                "held_out": dataset.held_out,
                "counts": dataset.counts(),
            },
            "evaluation": {k: v.to_dict() for k, v in held_out.items() if v is not None},
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped],
            "export_check": asdict(check),
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
        version_dir = publish(
            exported,
            Path(model_repository),
            name,
            {REPORT_FILENAME: json.dumps(report, indent=2, default=str).encode()},
        )
    result = TrainResult(
        name=name,
        version=int(version_dir.name),
        version_dir=version_dir,
        model_path=version_dir / MODEL_FILENAME,
        classes=dataset.classes,
        backbone=net.name,
        strategy=chosen.name,
        held_out=dataset.held_out,
        n_train=n_train,
        n_test=test.n if test else 0,
        test_accuracy=test.accuracy if test else None,
        val_accuracy=val.accuracy if val else None,
        params=dict(fitted.params),
        skipped=skipped,
        card=card,
        wall_seconds=time.perf_counter() - start,
    )
    log.info(
        "trained %s v%d (%s on %s) in %.1f s: test accuracy %s, %d files skipped",
        name,
        result.version,
        chosen.name,
        net.name,
        result.wall_seconds,
        f"{result.test_accuracy:.4f}" if result.test_accuracy is not None else "n/a",
        len(skipped),
    )
    return result


def _evaluate(context: FitContext, fitted: FittedHead, split: str) -> Evaluation | None:
    samples = context.splits.get(split, [])
    if not samples:
        return None
    features: Features
    if fitted.embedder is context.embedder:  # frozen backbone: reuse cached features
        features = context.features(split)
    else:
        features = extract_features(
            fitted.embedder, samples, batch_size=context.batch_size, workers=context.workers
        )
    if len(features.labels) == 0:
        log.warning("no readable %s images: cannot evaluate on %s", split, split)
        return None
    fitted.head.eval()
    with torch.inference_mode():
        logits = fitted.head(torch.from_numpy(features.embeddings))
        probabilities = torch.softmax(logits, dim=-1).numpy()
    return evaluate(probabilities, features.labels, context.classes)


def _skipped(context: FitContext) -> tuple[SkippedFile, ...]:
    seen: dict[Path, SkippedFile] = {}
    for features in context.cached().values():
        for skipped in features.skipped:
            seen.setdefault(skipped.path, skipped)
    return tuple(seen.values())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tlserve_version() -> str:
    try:
        return metadata.version("tlserve")
    except metadata.PackageNotFoundError:
        return "unknown"
