"""One training run: data → backbone → strategy → calibrate → evaluate → export → publish."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlserve.contract.card import ModelCard
from tlserve.contract.rules import MODEL_FILE, check_model_name, tlserve_version
from tlserve.training.backbones import Backbone, create_backbone
from tlserve.training.cache import default_cache_dir
from tlserve.training.calibration import calibrate_on, calibration_report
from tlserve.training.data import Dataset, load_dataset
from tlserve.training.distributed import broadcast_path, init_distributed
from tlserve.training.evaluate import Evaluation, evaluate
from tlserve.training.export import export_onnx
from tlserve.training.features import Features, SkippedFile, extract_features, load_images
from tlserve.training.heads import head_logits, softmax, with_temperature
from tlserve.training.loops import rank_and_world
from tlserve.training.publish import publish
from tlserve.training.report import REPORT_FILENAME, report_files
from tlserve.training.result import TrainResult
from tlserve.training.strategies import FitContext, FittedHead, create_strategy

__all__ = ["REPORT_FILENAME", "TrainResult", "train"]

log = logging.getLogger(__name__)

_EXPORT_SAMPLE_IMAGES = 8


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
    image_size: int | None = None,
    balanced: bool | None = None,
    calibrate: bool = True,
    cache: bool = True,
    cache_dir: Path | None = None,
    resume: bool = False,
    options: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train a classifier on the images in ``data_dir`` and publish it as ``name``.

    The new version lands in ``<model_repository>/<name>/<version>/`` with
    ``model.onnx`` (labels, preprocessing, metrics and provenance in its
    metadata), ``report.json``, ``report.md`` and its figures.

    ``strategy`` is ``linear``, ``trees``, ``finetune``, ``scratch`` or
    ``auto``; ``options`` are its settings (e.g. ``{"layer": -2}``,
    ``{"epochs": 3, "lr": "auto"}``). Probabilities are calibrated by a
    temperature fitted on held-out logits: the ``val/`` folder's, else the
    strategy's own (out-of-fold for ``linear``/``trees``, a validation slice
    of train for ``finetune``/``scratch``). ``image_size`` overrides the backbone's input
    size (smaller trains faster). ``balanced`` (None: when the largest class is
    at least twice the smallest) weights classes inversely to their size.
    ``cache`` keeps embeddings across runs in ``cache_dir`` (None: the default,
    ``$TLSERVE_CACHE_DIR`` or ``~/.cache/tlserve``). ``resume`` continues an interrupted
    ``finetune``/``scratch`` from its last epoch checkpoint. ``workers`` is
    the number of image decoding processes. Under ``torchrun`` the
    backbone-training strategies run with DistributedDataParallel; rank 0
    exports and publishes. Raises :class:`~tlserve.training.data.DataError`
    for unusable data and :class:`~tlserve.training.export.ExportError` if
    the export fails to verify.
    """
    start = time.perf_counter()
    check_model_name(name)  # before minutes of work, not after
    chosen = create_strategy(strategy, **dict(options or {}))
    init_distributed()
    _seed_everything(seed)
    dataset = load_dataset(Path(data_dir), seed=seed, test_fraction=test_fraction)
    log.info("data %s: %d classes, %s", data_dir, len(dataset.classes), dataset.counts())
    net = _with_size(create_backbone(backbone, weights=backbone_weights), image_size)
    train_counts = np.bincount(
        [label for _, label in dataset.train], minlength=len(dataset.classes)
    )
    if balanced is None:
        balanced = bool(train_counts.max() >= 2 * max(1, train_counts.min()))
    features_dir = (cache_dir or default_cache_dir()) if cache else None
    context = FitContext(
        classes=dataset.classes,
        backbone=net,
        splits=dataset.splits(),
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        balanced=balanced,
        cache_dir=features_dir,
        checkpoint_dir=_checkpoint_dir(dataset, net, strategy, name, dict(options or {})),
        resume=resume,
    )
    fitted = chosen.fit(context)
    strategy_name = str(fitted.extra.get("strategy", chosen.name))
    reason = str(fitted.extra.get("reason", ""))

    logits = {split: _logits(context, fitted, split) for split in ("val", "test")}
    val = logits["val"]
    calibration = (
        calibrate_on(_calibration_sets(fitted.extra, val), seed=seed) if calibrate else None
    )
    temperature = calibration.temperature if calibration else 1.0
    if calibration:
        log.info("calibration on %d held-out logits: %s", calibration.n, calibration.reason)
    head = with_temperature(fitted.head, temperature) if temperature != 1.0 else fitted.head
    held_out: dict[str, Evaluation] = {}
    for split, found in logits.items():
        if found is not None:
            held_out[split] = evaluate(softmax(found[0] / temperature), found[1], dataset.classes)
    uncalibrated = logits["test"] or logits["val"]
    before = (
        evaluate(softmax(uncalibrated[0]), uncalibrated[1], dataset.classes)
        if uncalibrated is not None
        else None
    )
    test, val_eval = held_out.get("test"), held_out.get("val")
    if test is not None:
        log.info("%s accuracy %.4f on %d held-out images", strategy_name, test.accuracy, test.n)

    metrics: dict[str, float] = {}
    for split, evaluation in held_out.items():
        metrics[f"{split}_accuracy"] = evaluation.accuracy
        metrics[f"{split}_macro_f1"] = evaluation.macro_f1
        metrics[f"{split}_expected_calibration_error"] = evaluation.expected_calibration_error
    if before is not None:
        metrics["uncalibrated_expected_calibration_error"] = before.expected_calibration_error
    if fitted.trained_backbone:  # images decoded, less the validation slice it held out
        held = len(fitted.extra.get("skipped", ())) + int(fitted.params.get("val_images", 0))
        n_train = len(dataset.train) - held
    else:
        n_train = len(context.features("train", fitted.layer).labels)
    card = ModelCard(
        labels=dataset.classes,
        preprocessing=fitted.embedder.preprocessing,
        backbone=net.name,
        strategy=strategy_name,
        metrics=metrics,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data_fingerprint=dataset.fingerprint(),
        tlserve_version=tlserve_version(),
        notes={
            "held_out": dataset.held_out,
            "n_train": str(n_train),
            "n_test": str(test.n if test else 0),
            "seed": str(seed),
            "temperature": f"{temperature:.6g}",
            "balanced": str(balanced),
            **({"selected_by": "auto", "auto_reason": reason} if reason else {}),
            **{key: str(value) for key, value in fitted.params.items()},
        },
    )
    skipped = _skipped(context, fitted)
    version_dir = Path()
    rank, _ = rank_and_world()
    if rank == 0:
        version_dir = _export_and_publish(
            dataset, context, fitted, head, card, model_repository, name,
            report={
                "name": name,
                "card": asdict(card),
                "strategy_requested": strategy,
                "reason": reason,
                "params": dict(fitted.params),
                "data": {
                    "root": str(dataset.root),
                    "held_out": dataset.held_out,
                    "counts": dataset.counts(),
                },
                "evaluation": {k: v.to_dict() for k, v in held_out.items()},
                "calibration": calibration_report(
                    calibration, before, test or val_eval, uncalibrated, seed=seed
                ),
                "history": fitted.history,
                "lr_curve": fitted.extra.get("lr_curve") or [],
                "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped],
            },
            start=start,
        )  # fmt: skip
    version_dir = broadcast_path(version_dir)
    result = TrainResult(
        name=name,
        version=int(version_dir.name),
        version_dir=version_dir,
        model_path=version_dir / MODEL_FILE,
        classes=dataset.classes,
        backbone=net.name,
        strategy=strategy_name,
        held_out=dataset.held_out,
        n_train=n_train,
        n_test=test.n if test else 0,
        test_accuracy=test.accuracy if test else None,
        val_accuracy=val_eval.accuracy if val_eval else None,
        params=dict(fitted.params),
        skipped=skipped,
        card=card,
        wall_seconds=time.perf_counter() - start,
        reason=reason,
        temperature=temperature,
        ece_before=before.expected_calibration_error if before else None,
        ece_after=_ece(test or val_eval),
        calibration_reason=calibration.reason if calibration else "",
    )
    if context.checkpoint_dir is not None and rank == 0:
        for leftover in context.checkpoint_dir.glob("last.pt*"):
            leftover.unlink()  # published: nothing left to resume
        with contextlib.suppress(OSError):  # not there, or not empty: leave it
            context.checkpoint_dir.rmdir()
    log.info(
        "trained %s v%d (%s on %s) in %.1f s: test accuracy %s, %d files skipped",
        name,
        result.version,
        strategy_name,
        net.name,
        result.wall_seconds,
        f"{result.test_accuracy:.4f}" if result.test_accuracy is not None else "n/a",
        len(skipped),
    )
    return result


def _export_and_publish(
    dataset: Dataset,
    context: FitContext,
    fitted: FittedHead,
    head: Any,
    card: ModelCard,
    repository: Path,
    name: str,
    *,
    report: dict[str, Any],
    start: float,
) -> Path:
    sample_paths = [path for path, _ in dataset.test + dataset.train]
    samples = load_images(sample_paths, card.preprocessing, limit=_EXPORT_SAMPLE_IMAGES)
    with tempfile.TemporaryDirectory(prefix="tlserve-export-") as tmp:
        exported = Path(tmp) / MODEL_FILE
        check = export_onnx(fitted.embedder, head, card, exported, samples)
        report["export_check"] = asdict(check)
        report["wall_seconds"] = round(time.perf_counter() - start, 3)
        return publish(exported, Path(repository), name, report_files(report, dataset.classes))


def _ece(evaluation: Evaluation | None) -> float | None:
    return evaluation.expected_calibration_error if evaluation else None


def _calibration_sets(
    extra: Mapping[str, Any], val: tuple[np.ndarray, np.ndarray] | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Held-out logits to fit T on: the strategy's own (out-of-fold, carved) and val/'s."""
    sets = []
    own = extra.get("calibration")
    if own is not None:
        sets.append((str(extra.get("calibration_source", "held-out logits")), *own))
    if val is not None:
        sets.append(("validation images", *val))
    return sets


def _logits(
    context: FitContext, fitted: FittedHead, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Uncalibrated logits and labels of ``split`` (None if it has no readable image)."""
    samples = context.splits.get(split, [])
    if not samples:
        return None
    features: Features
    if not fitted.trained_backbone:  # frozen backbone: reuse cached features
        features = context.features(split, fitted.layer)
    else:
        features = extract_features(
            fitted.embedder, samples, batch_size=context.batch_size, workers=context.workers
        )
    if len(features.labels) == 0:
        log.warning("no readable %s images: cannot evaluate on %s", split, split)
        return None
    return head_logits(fitted.head, features.embeddings), features.labels


def _with_size(net: Backbone, size: int | None) -> Backbone:
    if size is None:
        return net
    spec = dataclasses.replace(net.preprocessing, height=size, width=size)
    return dataclasses.replace(net, preprocessing=spec)


def _checkpoint_dir(
    dataset: Dataset, net: Backbone, strategy: str, name: str, options: Mapping[str, Any]
) -> Path:
    settings = sorted((k, repr(v)) for k, v in options.items())
    key = f"{dataset.fingerprint()} {net.name} {net.preprocessing} {strategy} {settings}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir().parent / "checkpoints" / f"{name}-{digest}"


def _skipped(context: FitContext, fitted: FittedHead) -> tuple[SkippedFile, ...]:
    seen: dict[Path, SkippedFile] = {}
    found = [s for features in context.cached().values() for s in features.skipped]
    for skipped in [*found, *fitted.extra.get("skipped", ())]:
        seen.setdefault(skipped.path, skipped)
    return tuple(seen.values())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
