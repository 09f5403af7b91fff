"""One training run: data → backbone → strategy → calibrate → evaluate → export → publish."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlserve.contract.card import ModelCard
from tlserve.contract.rules import MODEL_FILE, check_model_name, tlserve_version
from tlserve.training.artifact.export import export_onnx
from tlserve.training.artifact.publish import publish
from tlserve.training.artifact.requantize import build_for_dataset
from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.check.datacheck import check_before_training
from tlserve.training.check.ood import OodScorer, fit_for_model
from tlserve.training.config import TrainConfig
from tlserve.training.data.folders import Dataset, load_dataset
from tlserve.training.features.extract import SkippedFile, load_images
from tlserve.training.fit.calibration import calibrate_on, calibration_report
from tlserve.training.fit.distributed import broadcast_path, init_distributed
from tlserve.training.fit.evaluate import Evaluation, evaluate
from tlserve.training.fit.heads import softmax, with_temperature
from tlserve.training.fit.heldout import calibration_sets, held_out_logits
from tlserve.training.fit.loops import rank_and_world
from tlserve.training.fit.strategies import FitContext, FittedHead, create_strategy
from tlserve.training.fit.strategies.auto import probe_layers
from tlserve.training.report.files import (
    REPORT_FILENAME,
    candidate_row,
    candidates_note,
    report_files,
)
from tlserve.training.report.result import TrainResult

__all__ = ["REPORT_FILENAME", "TrainConfig", "TrainResult", "train"]

log = logging.getLogger(__name__)

_EXPORT_SAMPLE_IMAGES = 8


def train(config: TrainConfig | Path, /, **settings: Any) -> TrainResult:
    """Train a classifier as ``config`` says and publish it as ``config.name``.

    ``train(path, model_repository=..., name=..., ...)`` is shorthand for
    ``train(TrainConfig(path, model_repository=..., name=..., ...))``.

    The new version lands in ``<model_repository>/<name>/<version>/``:
    ``model.onnx`` (labels, preprocessing, metrics, provenance inside),
    ``report.json``, ``report.md`` and figures. Probabilities are calibrated
    on held-out logits (:func:`_calibration_sets`). Under ``torchrun`` rank 0
    exports and publishes. Raises :class:`~tlserve.training.data.folders.DataError`
    for unusable data, :class:`~tlserve.training.artifact.export.ExportError` if the
    export fails to verify.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig(Path(config), **settings)
    elif settings:
        raise TypeError("pass either a TrainConfig or a path with keyword settings, not both")
    start = time.perf_counter()
    check_model_name(config.name)  # before minutes of work, not after
    chosen = create_strategy(config.strategy, **dict(config.options))
    init_distributed()
    _seed_everything(config.seed)
    dataset = load_dataset(
        Path(config.data_dir), seed=config.seed, test_fraction=config.test_fraction
    )
    log.info("data %s: %d classes, %s", config.data_dir, len(dataset.classes), dataset.counts())
    net = _with_size(
        create_backbone(config.backbone, weights=config.backbone_weights), config.image_size
    )
    counts = np.bincount([label for _, label in dataset.train], minlength=len(dataset.classes))
    balanced = config.balanced
    if balanced is None:
        balanced = bool(counts.max() >= 2 * max(1, counts.min()))
    budget = config.budget(gpu=torch.cuda.is_available())
    context = FitContext(
        classes=dataset.classes,
        backbone=net,
        splits=dataset.splits(),
        seed=config.seed,
        batch_size=config.batch_size,
        workers=config.workers,
        balanced=balanced,
        cache_dir=config.features_dir,
        checkpoint_dir=_checkpoint_dir(config, dataset, net),
        resume=config.resume,
        deadline=None if budget is None else time.monotonic() + budget,
    )
    if budget is not None:
        log.info("time budget %.0f s (--time-budget)", budget)
    if config.strategy == "auto":  # one forward pass for the data check and the candidates
        context.probe_layers = probe_layers(net)
    data_check, context = check_before_training(
        context, seed=config.seed, drop_duplicates=config.drop_duplicates
    )
    fitted = chosen.fit(context)

    logits = {split: held_out_logits(context, fitted, split) for split in ("val", "test")}
    sets = calibration_sets(fitted, logits["val"])
    calibration = calibrate_on(sets, seed=config.seed) if config.calibrate else None
    temperature = calibration.temperature if calibration else 1.0
    if calibration:
        log.info("calibration on %d held-out logits: %s", calibration.n, calibration.reason)
    head = with_temperature(fitted.head, temperature) if temperature != 1.0 else fitted.head
    held_out: dict[str, Evaluation] = {}
    for split, found in logits.items():
        if found is not None:
            held_out[split] = evaluate(softmax(found[0] / temperature), found[1], dataset.classes)
    uncalibrated = logits["test"] or logits["val"]
    before = uncalibrated and evaluate(softmax(uncalibrated[0]), uncalibrated[1], dataset.classes)
    test, val_eval = held_out.get("test"), held_out.get("val")
    if test is not None:
        log.info("%s accuracy %.4f on %d held-out images", fitted.strategy, test.accuracy, test.n)
    metrics = {
        f"{split}_{key}": value
        for split, e in held_out.items()
        for key, value in (
            ("accuracy", e.accuracy),
            ("macro_f1", e.macro_f1),
            ("expected_calibration_error", e.expected_calibration_error),
        )
    }
    if before is not None:
        metrics["uncalibrated_expected_calibration_error"] = before.expected_calibration_error
    skipped = _skipped(context, fitted)
    if fitted.trained_backbone:  # images decoded, less the validation slice it held out
        n_train = len(dataset.train) - len(fitted.skipped) - fitted.val_images
    else:
        n_train = len(context.features("train", fitted.layer).labels)
    card = ModelCard(
        labels=dataset.classes,
        preprocessing=fitted.embedder.preprocessing,
        backbone=net.name,
        strategy=fitted.strategy,
        metrics=metrics,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data_fingerprint=dataset.fingerprint(),
        tlserve_version=tlserve_version(),
        notes={
            "held_out": dataset.held_out,
            "n_train": str(n_train),
            "n_test": str(test.n if test else 0),
            "seed": str(config.seed),
            "temperature": f"{temperature:.6g}",
            "balanced": str(balanced),
            **({"selected_by": "auto", "auto_reason": fitted.reason} if fitted.reason else {}),
            **({"candidates": candidates_note(fitted.candidates)} if fitted.candidates else {}),
            **{key: str(value) for key, value in fitted.params.items()},
        },
    )
    version_dir = Path()
    rank, _ = rank_and_world()
    if rank == 0:
        ood = fit_for_model(context, fitted)
        card = ood.on_card(card)  # threshold, AUROC and how it was fitted
        report = {
            "name": config.name,
            "card": asdict(card),
            "strategy_requested": config.strategy,
            "reason": fitted.reason,
            "candidates": [candidate_row(s) for s in fitted.candidates],
            "time_budget": budget,
            "params": dict(fitted.params),
            "data": {
                "root": str(dataset.root),
                "held_out": dataset.held_out,
                "counts": dataset.counts(),
            },
            "evaluation": {k: v.to_dict() for k, v in held_out.items()},
            "calibration": calibration_report(
                calibration, before, test or val_eval, uncalibrated, seed=config.seed
            ),
            "history": fitted.history,
            "lr_curve": fitted.lr_curve,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped],
            "data_check": data_check.to_dict(),
        }
        version_dir = _export_and_publish(dataset, fitted, head, card, config, report, start, ood)
    version_dir = broadcast_path(version_dir)
    result = TrainResult(
        name=config.name,
        version=int(version_dir.name),
        version_dir=version_dir,
        model_path=version_dir / MODEL_FILE,
        classes=dataset.classes,
        backbone=net.name,
        strategy=fitted.strategy,
        held_out=dataset.held_out,
        n_train=n_train,
        n_test=test.n if test else 0,
        test_accuracy=test.accuracy if test else None,
        val_accuracy=val_eval.accuracy if val_eval else None,
        params=dict(fitted.params),
        skipped=skipped,
        card=card,
        wall_seconds=time.perf_counter() - start,
        reason=fitted.reason,
        temperature=temperature,
        ece_before=before.expected_calibration_error if before else None,
        ece_after=_ece(test or val_eval),
        calibration_reason=calibration.reason if calibration else "",
        candidates=fitted.candidates,
    )
    if context.checkpoint_dir is not None and rank == 0:  # published: nothing left to resume
        _remove_checkpoints(context.checkpoint_dir)
    accuracy = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    log.info(
        "trained %s v%d (%s on %s) in %.1f s: test accuracy %s, %d files skipped",
        *(config.name, result.version, fitted.strategy, net.name, result.wall_seconds),
        *(accuracy, len(skipped)),
    )
    return result


def _export_and_publish(
    dataset: Dataset,
    fitted: FittedHead,
    head: Any,
    card: ModelCard,
    config: TrainConfig,
    report: dict[str, Any],
    start: float,
    ood: OodScorer | None = None,
) -> Path:
    sample_paths = [path for path, _ in dataset.test + dataset.train]
    samples = load_images(sample_paths, card.preprocessing, limit=_EXPORT_SAMPLE_IMAGES)
    with tempfile.TemporaryDirectory(prefix="tlserve-export-") as tmp:
        exported = Path(tmp) / MODEL_FILE
        check = export_onnx(fitted.embedder, head, card, exported, samples, ood=ood)
        report["export_check"] = asdict(check)
        made, variant_files = build_for_dataset(
            exported, dataset, card.preprocessing, mode=config.quantize, seed=config.seed
        )
        report["variant"] = made.to_dict() if made else None
        report["wall_seconds"] = round(time.perf_counter() - start, 3)
        files = {**report_files(report, dataset.classes), **variant_files}
        return publish(exported, Path(config.model_repository), config.name, files)


def _ece(evaluation: Evaluation | None) -> float | None:
    return evaluation.expected_calibration_error if evaluation else None


def _with_size(net: Backbone, size: int | None) -> Backbone:
    if size is None:
        return net
    spec = dataclasses.replace(net.preprocessing, height=size, width=size)
    return dataclasses.replace(net, preprocessing=spec)


def _checkpoint_dir(config: TrainConfig, dataset: Dataset, net: Backbone) -> Path:
    settings = sorted((k, repr(v)) for k, v in config.options.items())
    key = f"{dataset.fingerprint()} {net.name} {net.preprocessing} {config.strategy} {settings}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return config.checkpoints_dir / f"{config.name}-{digest}"


def _remove_checkpoints(directory: Path) -> None:
    for leftover in directory.glob("last.pt*"):
        leftover.unlink()
    with contextlib.suppress(OSError):  # not there, or not empty: leave it
        directory.rmdir()


def _skipped(context: FitContext, fitted: FittedHead) -> tuple[SkippedFile, ...]:
    seen: dict[Path, SkippedFile] = {}
    found = [s for features in context.cached().values() for s in features.skipped]
    for skipped in [*found, *fitted.skipped]:
        seen.setdefault(skipped.path, skipped)
    return tuple(seen.values())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
