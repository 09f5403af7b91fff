"""trees, earlier-layer features, finetune, scratch, auto: each trains, exports and verifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tests.training.shapes import TINY_BACKBONE, fit_context
from tlserve.contract.errors import ConfigError
from tlserve.contract.images import prepare_image
from tlserve.training import train
from tlserve.training.backbone.backbones import Backbone
from tlserve.training.backbone.layers import PooledFeatures, layer_channels, parse_layer
from tlserve.training.config import cache_root
from tlserve.training.data.folders import load_dataset
from tlserve.training.fit.strategies import STRATEGIES, create_strategy
from tlserve.training.fit.strategies.finetune import FineTune, Scratch
from tlserve.training.fit.strategies.scenarios import Measurements, choose


def _onnx_accuracy(model_path: Path, root: Path) -> float:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    spec = json.loads(meta["tlserve.preprocessing"])
    dataset = load_dataset(root)
    from tlserve.contract.card import Preprocessing

    prep = Preprocessing.from_dict(spec)
    images = np.stack([prepare_image(path, prep) for path, _ in dataset.test])
    (probabilities,) = session.run(["probabilities"], {"images": images})
    labels = np.array([label for _, label in dataset.test])
    return float((probabilities.argmax(axis=1) == labels).mean())


@pytest.mark.parametrize(("strategy", "layer"), [("trees", "last"), ("trees", -2), ("linear", -2)])
@pytest.mark.slow
def test_frozen_strategies_export_one_verified_model(
    shapes_folder: Path, tmp_path: Path, strategy: str, layer: str | int
) -> None:
    result = train(
        shapes_folder,
        model_repository=tmp_path / "models",
        name="shapes",
        strategy=strategy,
        backbone=TINY_BACKBONE,
        workers=0,
        cache=False,
        options={"layer": layer},
    )
    assert result.strategy == strategy and result.params["layer"] == str(layer)
    assert result.test_accuracy is not None and result.test_accuracy >= 0.6  # chance 0.33
    # The served graph computes what was evaluated: onnxruntime on the test folder agrees.
    assert _onnx_accuracy(result.model_path, shapes_folder) == pytest.approx(result.test_accuracy)
    report = json.loads((result.version_dir / "report.json").read_text())
    assert report["export_check"]["probabilities_max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    width = {o.name: o.shape for o in session.get_outputs()}["embeddings"][1]
    # -2: test_convnext's third stage (48 channels), not its 64-dim embedding.
    assert width == (48 if layer == -2 else 64)


def test_pooled_features_of_an_earlier_stage(tiny_backbone: Backbone) -> None:
    module = tiny_backbone.module
    assert parse_layer("last") is None and parse_layer("-2") == -2
    with pytest.raises(ValueError, match="negative"):
        parse_layer("2")
    both = PooledFeatures(module, (None, -2))
    with torch.inference_mode():
        out = both(torch.zeros(2, 3, 64, 64))
        last = module(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, layer_channels(module, None) + layer_channels(module, -2))
    torch.testing.assert_close(out[:, : last.shape[1]], last)


def test_finetune_changes_the_backbone_not_the_original_and_resumes(
    shapes_folder: Path, tiny_backbone: Backbone, tmp_path: Path
) -> None:
    before = {k: v.clone() for k, v in tiny_backbone.module.state_dict().items()}
    first = FineTune(epochs=1, lr=3e-3, augment="none").fit(
        fit_context(shapes_folder, tiny_backbone, checkpoint_dir=tmp_path / "ckpt")
    )
    assert first.trained_backbone and len(first.history) == 1
    after = tiny_backbone.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # cached features stay valid
    trained = first.embedder.backbone.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before if "weight" in k)
    # An interrupted 2-epoch run picks up after epoch 1 from the checkpoint.
    context = fit_context(shapes_folder, tiny_backbone, checkpoint_dir=tmp_path / "ckpt")
    context.resume = True
    resumed = FineTune(epochs=2, lr=3e-3, augment="none").fit(context)
    assert resumed.params["resumed_from_epoch"] == 1
    assert [row["epoch"] for row in resumed.history] == [1.0, 2.0]


def test_finetune_lr_auto_and_partial_unfreeze(
    shapes_folder: Path, tiny_backbone: Backbone, tmp_path: Path
) -> None:
    strategy = FineTune(epochs=1, lr="auto", unfreeze=2, augment="flip", bn="train")
    context = fit_context(shapes_folder, tiny_backbone, checkpoint_dir=tmp_path / "ckpt")
    fitted = strategy.fit(context)
    assert 1e-7 < float(fitted.params["lr"]) < 1.0
    assert len(fitted.lr_curve) > 5
    total = sum(p.numel() for p in tiny_backbone.module.parameters())
    assert 0 < int(fitted.params["trainable_parameters"]) < total


def test_scratch_from_random_weights_skips_corrupt_images(
    shapes_folder: Path, tiny_backbone: Backbone, tmp_path: Path
) -> None:
    corrupt = shapes_folder / "train" / "circle" / "002.png"
    corrupt.write_bytes(b"not a png")
    fitted = Scratch(epochs=1, pretrained=False).fit(
        fit_context(shapes_folder, tiny_backbone, checkpoint_dir=tmp_path / "ckpt")
    )
    assert fitted.trained_backbone and fitted.history[0]["train_loss"] > 0
    assert [s.path for s in fitted.skipped] == [corrupt]


@pytest.mark.slow
def test_finetune_end_to_end_report_curves_and_calibration(
    shapes_folder: Path, tmp_path: Path
) -> None:
    result = train(
        shapes_folder,
        model_repository=tmp_path / "models",
        name="ft",
        strategy="finetune",
        backbone=TINY_BACKBONE,
        workers=0,
        cache=False,
        options={"epochs": 2, "lr": 3e-3},
    )
    files = {p.name for p in result.version_dir.iterdir()}
    assert {"model.onnx", "report.json", "report.md", "confusion.png", "curves.png"} <= files
    for png in ("confusion.png", "curves.png", "calibration.png"):
        with Image.open(result.version_dir / png) as image:
            assert image.format == "PNG" and image.size[0] > 100
    markdown = (result.version_dir / "report.md").read_text()
    assert "![curves](curves.png)" in markdown and "macro-F1" in markdown
    report = json.loads((result.version_dir / "report.json").read_text())
    assert len(report["history"]) == 2
    assert report["calibration"]["temperature"] == pytest.approx(result.temperature)
    assert "validation images held out of train/" in report["calibration"]["fitted_on"]
    assert int(result.params["val_images"]) == 6  # 15% of 12 per class, 3 classes
    assert result.temperature == 1.0 and "fewer than the 10 needed" in markdown
    assert result.card.notes["temperature"] == f"{result.temperature:.6g}"
    assert _onnx_accuracy(result.model_path, shapes_folder) == pytest.approx(result.test_accuracy)
    # Published: its resume checkpoint is gone, folder and all.
    assert not list((cache_root() / "checkpoints").glob("ft-*"))


@pytest.mark.slow
def test_auto_scores_every_candidate_and_reports_them(shapes_folder: Path, tmp_path: Path) -> None:
    result = train(
        shapes_folder,
        model_repository=tmp_path / "models",
        name="auto",
        strategy="auto",
        backbone=TINY_BACKBONE,
        workers=0,
        cache=False,
        time_budget=600,
        options={"epochs": 2, "lr": 3e-3},
    )
    names = {"linear", "linear@-2", "linear@multi", "trees", "finetune", "scratch"}
    found = {s.name for s in result.candidates}
    # Besides: the near-tied heads averaged, when some tie, and the geometries scored.
    geometries = {name for name in found if name.startswith("linear, ")}
    assert names <= found and found - names - geometries <= {"linear@combined"}
    assert len([g for g in geometries if g.endswith("(adopted)")]) == 1
    names = found
    winner = result.params["auto_winner"]
    assert winner in names - geometries and result.strategy == str(winner).split("@")[0]
    assert result.card.notes["selected_by"] == "auto" and result.reason.startswith(str(winner))
    report = json.loads((result.version_dir / "report.json").read_text())
    assert {row["name"] for row in report["candidates"]} == names
    for row in report["candidates"]:
        low, high = row["val_interval_95"]
        assert low <= row["val_accuracy"] <= high and row["train_seconds"] >= 0
        assert row["serve_ms_per_image"] > 0 and "estimated" in row["serve_cost_source"]
    markdown = (result.version_dir / "report.md").read_text()
    assert "## Candidates" in markdown and f"| {winner} (chosen) |" in markdown
    assert all(f"| {name}" in markdown for name in names)
    assert "| candidate | val accuracy |" in result.summary()
    assert all(name in result.card.notes["candidates"] for name in names)


@pytest.mark.parametrize(
    ("per_class", "last", "earlier", "confidence", "expected"),
    [
        (50, 0.90, 0.80, 0.5, ("linear", False)),
        (50, 0.80, 0.90, 0.5, ("linear", True)),
        (50, 0.90, 0.90, 0.05, ("linear", True)),
        (1000, 0.90, 0.80, 0.5, ("finetune", False)),
        (1000, 0.80, 0.90, 0.5, ("scratch", False)),
    ],
)
def test_auto_maps_measurements_onto_the_four_scenarios(
    per_class: int, last: float, earlier: float, confidence: float, expected: tuple[str, bool]
) -> None:
    m = Measurements(per_class, per_class, confidence, 0.5, last, earlier, "-2")
    strategy, use_earlier, reason = choose(m, large_per_class=300, margin=0.01, min_confidence=0.15)
    assert (strategy, use_earlier) == expected
    assert f"{last:.3f}" in reason


def test_registry_has_every_strategy() -> None:
    assert set(STRATEGIES) == {"linear", "trees", "finetune", "scratch", "auto"}
    auto = create_strategy("auto", epochs=2, folds=3)
    assert auto.options == {"epochs": 2}  # type: ignore[attr-defined]  # for its finetune
    assert auto.folds == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "options", "named"),
    [
        ("finetune", {"epoch": 3}, "'epoch'; it takes augment, "),  # a typo of epochs
        ("linear", {"epochs": 3, "layer": -2}, "'epochs'; it takes c_grid, folds, layer"),
        ("auto", {"layer": -2}, "'layer'; it takes "),  # auto picks the layer itself
    ],
)
def test_an_option_the_strategy_does_not_have_is_refused_by_name(
    name: str, options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=f"strategy '{name}' has no option {named}"):
        create_strategy(name, **options)
