"""One training run, stage by stage: data → check → fit → calibrate → evaluate → export → publish.

Each stage adds its section to the run's :class:`RunRecord`, which becomes
``report.json``, ``report.md``, the model card's notes and the :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import tempfile
import time
from dataclasses import replace
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
from tlserve.training.check.ood import fit_for_model
from tlserve.training.config import TrainConfig
from tlserve.training.data.folders import Dataset, load_dataset
from tlserve.training.features.extract import SkippedFile, load_images
from tlserve.training.fit.calibration import calibrate_on
from tlserve.training.fit.distributed import broadcast_path, init_distributed
from tlserve.training.fit.evaluate import Evaluation, evaluate
from tlserve.training.fit.heads import Head, softmax, with_temperature
from tlserve.training.fit.heldout import calibration_sets, held_out_logits
from tlserve.training.fit.loops import rank_and_world
from tlserve.training.fit.strategies import FitContext, FittedHead, create_strategy
from tlserve.training.fit.strategies.auto import AutoStrategy, probe_layers
from tlserve.training.fit.strategies.budget import default_budget
from tlserve.training.report.files import report_files
from tlserve.training.report.record import REPORT_FILENAME, ChosenRecord, DataRecord, RunRecord
from tlserve.training.report.result import TrainResult
from tlserve.training.report.sections import (
    CalibrationReport,
    Candidate,
    OodRecord,
    calibration_report,
)
from tlserve.training.report.variant_section import VariantsRecord

__all__ = ["REPORT_FILENAME", "TrainConfig", "TrainResult", "train"]

log = logging.getLogger(__name__)

_EXPORT_SAMPLE_IMAGES = 8


def train(config: TrainConfig | Path, /, **settings: Any) -> TrainResult:
    """Train a classifier as ``config`` says and publish it as ``config.name``.

    ``train(path, model_repository=..., name=..., ...)`` is shorthand for
    ``train(TrainConfig(path, model_repository=..., name=..., ...))``.

    The new version lands in ``<model_repository>/<name>/<version>/``:
    ``model.onnx`` (labels, preprocessing, metrics, provenance inside),
    ``report.json`` (the run's :class:`RunRecord`), ``report.md`` and figures.
    Probabilities are calibrated on held-out logits. Under ``torchrun`` rank 0
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
    budget = config.budget(gpu=torch.cuda.is_available())
    context = _fit_context(config, dataset, net, budget)
    budget_rule = ""
    if budget is None and config.strategy == "auto":  # sized to the data, said up front
        auto = chosen if isinstance(chosen, AutoStrategy) else AutoStrategy()
        plan = default_budget(
            context,
            candidates=len(auto.trained),
            rung_epochs=auto.rung_epochs,
            leader_epochs=auto.leader_epochs,
        )
        budget, budget_rule = plan.seconds, plan.reason
        context.deadline = time.monotonic() + budget
        log.info("time budget %.0f s (auto's default for this data: %s)", budget, budget_rule)
    data_check, context = check_before_training(
        context, seed=config.seed, drop_duplicates=config.drop_duplicates
    )
    fitted = chosen.fit(context)

    head, evaluation, calibration = _calibrate_and_evaluate(context, fitted, config)
    record = RunRecord(
        name=config.name,
        data=_data_record(dataset, context, fitted),
        chosen=ChosenRecord(
            requested=config.strategy,
            strategy=fitted.strategy,
            reason=fitted.reason,
            params=dict(fitted.params),
            time_budget=budget,
            budget_rule=budget_rule,
            seed=config.seed,
            balanced=context.balanced,
            history=fitted.history,
            lr_curve=fitted.lr_curve,
        ),
        candidates=tuple(Candidate.from_score(s) for s in fitted.candidates),
        evaluation=evaluation,
        calibration=calibration,
        data_check=data_check,
    )
    record = replace(record, card=_card(record, fitted, net, dataset))
    version_dir = Path()
    rank, _ = rank_and_world()
    if rank == 0:
        version_dir, record = _export_and_publish(
            dataset, context, fitted, head, config, record, start
        )
    version_dir = broadcast_path(version_dir)
    result = TrainResult(record, version_dir, wall_seconds=time.perf_counter() - start)
    if context.checkpoint_dir is not None and rank == 0:  # published: nothing left to resume
        _remove_checkpoints(context.checkpoint_dir)
    accuracy = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    log.info(
        "trained %s v%d (%s on %s) in %.1f s: test accuracy %s, %d files skipped",
        *(config.name, result.version, fitted.strategy, net.name, result.wall_seconds),
        *(accuracy, len(result.skipped)),
    )
    return result


def _fit_context(
    config: TrainConfig, dataset: Dataset, net: Backbone, budget: float | None
) -> FitContext:
    counts = np.bincount([label for _, label in dataset.train], minlength=len(dataset.classes))
    balanced = config.balanced
    if balanced is None:
        balanced = bool(counts.max() >= 2 * max(1, counts.min()))
    if config.time_budget is not None:
        log.info("time budget %.0f s (--time-budget)", budget)
    elif budget is not None:
        log.info("time budget %.0f s (the default with a GPU)", budget)
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
    if config.strategy == "auto":  # one forward pass for the data check and the candidates
        context.probe_layers = probe_layers(net)
    return context


def _calibrate_and_evaluate(
    context: FitContext, fitted: FittedHead, config: TrainConfig
) -> tuple[Head, dict[str, Evaluation], CalibrationReport | None]:
    """The head with its temperature, its held-out figures, and the calibration section."""
    classes = context.classes
    logits = {split: held_out_logits(context, fitted, split) for split in ("val", "test")}
    sets = calibration_sets(fitted, logits["val"])
    calibration = calibrate_on(sets, seed=config.seed) if config.calibrate else None
    temperature = calibration.temperature if calibration else 1.0
    if calibration:
        log.info("calibration on %d held-out logits: %s", calibration.n, calibration.reason)
    head = with_temperature(fitted.head, temperature) if temperature != 1.0 else fitted.head
    held_out = {
        split: evaluate(softmax(found[0] / temperature), found[1], classes)
        for split, found in logits.items()
        if found is not None
    }
    test = held_out.get("test")
    if test is not None:
        log.info("%s accuracy %.4f on %d held-out images", fitted.strategy, test.accuracy, test.n)
    uncalibrated = logits["test"] or logits["val"]
    before = evaluate(softmax(uncalibrated[0]), uncalibrated[1], classes) if uncalibrated else None
    after = test or held_out.get("val")
    report = calibration_report(calibration, before, after, uncalibrated, seed=config.seed)
    return head, held_out, report


def _data_record(dataset: Dataset, context: FitContext, fitted: FittedHead) -> DataRecord:
    if fitted.trained_backbone:  # images decoded, less the validation slice it held out
        n_train = len(dataset.train) - len(fitted.skipped) - fitted.val_images
    else:
        n_train = len(context.features("train", fitted.layer).labels)
    return DataRecord(
        root=str(dataset.root),
        held_out=dataset.held_out,
        counts=dataset.counts(),
        n_train=n_train,
        skipped=_skipped(context, fitted),
    )


def _card(record: RunRecord, fitted: FittedHead, net: Backbone, dataset: Dataset) -> ModelCard:
    """The model card: provenance, and the record's metrics and notes."""
    return ModelCard(
        labels=dataset.classes,
        preprocessing=fitted.embedder.preprocessing,
        backbone=net.name,
        strategy=fitted.strategy,
        metrics=record.card_metrics(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data_fingerprint=dataset.fingerprint(),
        tlserve_version=tlserve_version(),
        notes=record.card_notes(),
    )


def _export_and_publish(
    dataset: Dataset,
    context: FitContext,
    fitted: FittedHead,
    head: Head,
    config: TrainConfig,
    record: RunRecord,
    start: float,
) -> tuple[Path, RunRecord]:
    """Fit the OOD score, export, verify, make the variants, publish with the report."""
    assert record.card is not None  # built before the export
    ood = fit_for_model(context, fitted)
    card = ood.on_card(record.card)  # threshold, AUROC and how it was fitted
    record = replace(record, card=card, ood=OodRecord.from_scorer(ood))
    sample_paths = [path for path, _ in dataset.test + dataset.train]
    samples = load_images(sample_paths, card.preprocessing, limit=_EXPORT_SAMPLE_IMAGES)
    with tempfile.TemporaryDirectory(prefix="tlserve-export-") as tmp:
        exported = Path(tmp) / MODEL_FILE
        check = export_onnx(fitted.embedder, head, card, exported, samples, ood=ood)
        made, variant_files = build_for_dataset(
            exported, dataset, card.preprocessing, mode=config.quantize, seed=config.seed
        )
        record = replace(
            record,
            export_check=check,
            variant=VariantsRecord.from_report(made) if made else None,
            wall_seconds=time.perf_counter() - start,
        )
        files = {**report_files(record), **variant_files}
        return publish(exported, Path(config.model_repository), config.name, files), record


def _with_size(net: Backbone, size: int | None) -> Backbone:
    if size is None:
        return net
    spec = replace(net.preprocessing, height=size, width=size)
    return replace(net, preprocessing=spec)


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
