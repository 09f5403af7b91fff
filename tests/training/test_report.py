"""Calibration folded into the graph, the report files, `tlserve inspect`, the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.training.shapes import TINY_BACKBONE, write_shapes
from tlserve.cli.main import STRATEGY_NAMES
from tlserve.contract.card import ModelCard, Preprocessing
from tlserve.training import train
from tlserve.training.backbone.backbones import Backbone
from tlserve.training.data.folders import load_dataset
from tlserve.training.fit.calibration import (
    calibrate_on,
    choose_temperature,
    ece_change_interval,
    fit_temperature,
)
from tlserve.training.fit.evaluate import evaluate
from tlserve.training.fit.heads import softmax
from tlserve.training.fit.strategies import STRATEGIES, FitContext
from tlserve.training.report.markdown import report_markdown
from tlserve.training.report.record import ChosenRecord, DataRecord, RunRecord
from tlserve.training.report.sections import calibration_report


def test_temperature_is_recovered_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    calibrated = rng.normal(0, 2, (4000, 4))
    p = softmax(calibrated)
    labels = np.array([rng.choice(4, p=row) for row in p])  # drawn from its own probabilities
    overconfident = calibrated * 3.0  # a model three times too sure of itself
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = evaluate(softmax(overconfident), labels, "abcd").expected_calibration_error
    after = evaluate(softmax(overconfident / temperature), labels, "abcd")
    assert after.expected_calibration_error < before / 3
    assert 0.0 <= after.macro_f1 <= 1.0 and after.per_class["a"].recall is not None
    # With 4000 images the data is sure of T: the fitted T is applied, its interval holds 3.
    chosen = choose_temperature(overconfident, labels)
    low, high = chosen.interval
    assert low <= 3.0 <= high and chosen.temperature == pytest.approx(temperature)
    assert chosen.cv_ece_fitted < chosen.cv_ece_t1 and chosen.n == 4000
    # ... and the held-out ECE change is surely negative.
    low, high = ece_change_interval(overconfident, labels, chosen.temperature)
    assert low < high < 0
    assert choose_temperature(calibrated, labels).temperature == 1.0


def test_small_calibration_sets_need_an_interval_that_excludes_1() -> None:
    rng = np.random.default_rng(1)
    calibrated = rng.normal(0, 2, (150, 10))
    labels = np.array([rng.choice(10, p=row) for row in softmax(calibrated)])
    # 150 images from a 1.5x overconfident model: enough to be sure T > 1.
    chosen = choose_temperature(calibrated * 1.5, labels)
    assert 1.0 < chosen.interval[0] < chosen.temperature < chosen.interval[1]
    # Barely overconfident (1.05x) on 150 images: 1 stays plausible and is kept.
    kept = choose_temperature(calibrated * 1.05, labels)
    assert kept.interval[0] < 1.0 < kept.interval[1]
    assert kept.temperature == 1.0 and "T = 1 kept" in kept.reason


@pytest.mark.slow
def test_report_calibration_in_graph_and_inspect(shapes_folder: Path, tmp_path: Path) -> None:
    result = train(
        shapes_folder,
        model_repository=tmp_path / "models",
        name="shapes",
        strategy="linear",
        backbone=TINY_BACKBONE,
        workers=0,
    )
    report = json.loads((result.version_dir / "report.json").read_text())
    calibration = report["calibration"]
    assert calibration["temperature"] == pytest.approx(result.temperature)
    assert "out-of-fold" in calibration["fitted_on"]  # linear keeps every image for training
    assert calibration["fitted_temperature"] > 0 and "cv_ece_t1" in calibration
    low, high = calibration["interval"]
    assert low <= calibration["fitted_temperature"] <= high and calibration["reason"]
    # The exported probabilities are softmax(logits / T): their confidence moved with T.
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["tlserve.notes"])["temperature"] == f"{result.temperature:.6g}"
    test = report["evaluation"]["test"]
    assert test["expected_calibration_error"] == pytest.approx(calibration["ece_after"])
    # The run record reads report.json back whole, and one from before a key existed too.
    record = RunRecord.load(result.version_dir)
    assert json.loads(record.to_json()) == report
    assert record.card_notes().items() <= result.card.notes.items()
    older = {k: v for k, v in report.items() if k not in ("strategy", "seed", "balanced", "ood")}
    assert RunRecord.from_dict(older).chosen.strategy == "linear"
    for png in ("confusion.png", "calibration.png"):
        with Image.open(result.version_dir / png) as image:
            image.verify()
    assert "![confusion](confusion.png)" in (result.version_dir / "report.md").read_text()

    shown = subprocess.run(
        [sys.executable, "-m", "tlserve.cli.main", "inspect", str(result.version_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "strategy   linear" in shown.stdout and "calibration T=" in shown.stdout
    assert calibration["reason"] in shown.stdout
    assert f"accuracy {result.test_accuracy:.4f}" in shown.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "tlserve.cli.main", "inspect", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "no model.onnx" in missing.stderr


def test_features_are_cached_on_disk(
    shapes_folder: Path, tiny_backbone: Backbone, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = load_dataset(shapes_folder)

    def context() -> FitContext:
        return FitContext(
            classes=dataset.classes,
            backbone=tiny_backbone,
            splits=dataset.splits(),
            workers=0,
            cache_dir=tmp_path / "features",
        )

    first = context().features("train")
    assert len(list((tmp_path / "features").glob("*.npz"))) == 1
    with caplog.at_level("INFO"):
        again = context().features("train")
    assert any("features from cache" in r.message for r in caplog.records)
    assert not any(r.message.startswith("embedded") for r in caplog.records)
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    assert again.paths == first.paths
    # A changed image is a different key: embedded afresh, not served stale.
    changed = dataset.train[0][0]
    changed.write_bytes(changed.read_bytes() + b"\0")
    caplog.clear()
    with caplog.at_level("INFO"):
        context().features("train")
    assert any(r.message.startswith("embedded") for r in caplog.records)


@pytest.mark.slow
def test_imbalanced_mixed_mode_data_is_weighted_and_read(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_shapes(root / "train", 4, seed=1)
    write_shapes(tmp_path / "extra", 12, seed=5)
    for path in sorted((tmp_path / "extra" / "circle").iterdir()):
        path.rename(root / "train" / "circle" / f"x{path.name}")
    # Mixed modes: greyscale, palette and RGBA images beside RGB ones.
    square = sorted((root / "train" / "square").iterdir())
    for path, mode in zip(square, ("L", "P", "RGBA"), strict=False):
        with Image.open(path) as image:
            image.convert(mode).save(path)
    result = train(
        root,
        model_repository=tmp_path / "m",
        name="imb",
        strategy="linear",
        backbone=TINY_BACKBONE,
        workers=0,
    )
    assert result.card.notes["balanced"] == "True"  # 13 circles vs 3 squares in train
    assert not result.skipped


@pytest.mark.slow
def test_cli_train_flags_reach_the_strategy(shapes_folder: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tlserve.cli.main", "train", str(shapes_folder),
         "--model-repository", str(tmp_path / "m"), "--name", "ft", "--backbone", TINY_BACKBONE,
         "--strategy", "finetune", "--epochs", "1", "--lr", "0.003", "--image-size", "48",
         "--unfreeze", "2", "--augment", "none", "--class-weights", "none", "--seed", "1",
         "--workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    card = json.loads((tmp_path / "m" / "ft" / "1" / "report.json").read_text())["card"]
    assert card["strategy"] == "finetune" and card["preprocessing"]["height"] == 48
    assert card["notes"]["epochs"] == "1" and card["notes"]["lr"] == "0.003"
    assert card["notes"]["seed"] == "1" and card["notes"]["balanced"] == "False"
    # The CLI offers exactly the strategies there are, and refuses others as bad usage.
    assert set(STRATEGY_NAMES) == set(STRATEGIES)
    wrong = subprocess.run(
        [sys.executable, "-m", "tlserve.cli.main", "train", str(shapes_folder),
         "--model-repository", str(tmp_path / "m"), "--name", "x", "--strategy", "svm"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong.returncode == 2 and "invalid choice: 'svm'" in wrong.stderr


def test_report_says_whether_the_ece_change_is_more_than_noise() -> None:
    rng = np.random.default_rng(2)
    calibrated = rng.normal(0, 2, (300, 3))
    labels = np.array([rng.choice(3, p=row) for row in softmax(calibrated)])
    overconfident = calibrated * 2.0
    chosen = calibrate_on([("validation images", overconfident, labels)])
    assert chosen is not None and chosen.temperature > 1.0

    def markdown(logits: np.ndarray, labels: np.ndarray) -> str:
        before = evaluate(softmax(logits), labels, "abc")
        after = evaluate(softmax(logits / chosen.temperature), labels, "abc")
        record = RunRecord(
            name="m",
            data=DataRecord(root="d", held_out="test", counts={}),
            chosen=ChosenRecord(requested="linear", strategy="linear"),
            card=ModelCard(labels=tuple("abc"), preprocessing=Preprocessing(height=8, width=8)),
            evaluation={"test": after},
            calibration=calibration_report(chosen, before, after, (logits, labels)),
        )
        return report_markdown(record, [])

    # Scored on images as overconfident as the calibration set: a clear gain.
    clear = markdown(overconfident, labels)
    assert f"Temperature T = {chosen.temperature:.3f}" in clear
    assert "interval of that change" in clear and "within what sampling" not in clear
    # On 60 nearly calibrated images, T's effect is within noise, and the report says so.
    noisy = markdown(calibrated[:60] * 1.1, labels[:60])
    assert "within what sampling alone moves ECE" in noisy
