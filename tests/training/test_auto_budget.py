"""``auto``'s default budget: a trained backbone is admitted for enough data, not for a little."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.training.shapes import TINY_BACKBONE
from tlserve.training import train
from tlserve.training.config import TrainConfig
from tlserve.training.fit.strategies.budget import (
    CPU_CEILING_SECONDS,
    FROZEN_SECONDS,
    plan_budget,
    race_epochs,
)

# lite0 at 224 px on 2 cores: about 20 ms per image forward (torch, batch 32).
FORWARD_MS = 20.0


def test_a_medium_dataset_gets_a_fine_tune_within_fifteen_minutes() -> None:
    # The inspection scans: 1,630 training images of 2 classes.
    plan = plan_budget(n_train=1630, n_classes=2, n_images=1630 + 699, forward_ms=FORWARD_MS)
    assert plan.admits_trained
    assert plan.seconds <= CPU_CEILING_SECONDS
    epoch = 3 * FORWARD_MS / 1000 * 1630  # about three forwards per training image
    assert plan.trained_seconds >= 2 * epoch * 0.8  # at least the first rung
    assert "trained backbone" in plan.reason and "epochs" in plan.reason


def test_a_tiny_dataset_and_the_example_data_get_the_frozen_heads_only() -> None:
    tiny = plan_budget(n_train=60, n_classes=3, n_images=90, forward_ms=FORWARD_MS)
    assert not tiny.admits_trained and tiny.trained_seconds == 0
    assert tiny.seconds < 2 * FROZEN_SECONDS and "--time-budget" in tiny.reason
    # 1,000 images of 10 classes (examples/): 100 per class, where the probe is as good.
    example = plan_budget(n_train=1000, n_classes=10, n_images=1300, forward_ms=FORWARD_MS)
    assert not example.admits_trained and "100 per class" in example.reason
    assert example.seconds < 2 * FROZEN_SECONDS


def test_a_fine_tune_that_cannot_fit_fifteen_minutes_is_not_admitted() -> None:
    slow = plan_budget(n_train=20000, n_classes=10, n_images=25000, forward_ms=FORWARD_MS)
    assert not slow.admits_trained and "past the 15-minute default" in slow.reason


def test_the_plan_grows_with_the_data_and_the_forward_time() -> None:
    small = plan_budget(n_train=1200, n_classes=4, n_images=1500, forward_ms=10.0)
    larger = plan_budget(n_train=2400, n_classes=4, n_images=3000, forward_ms=10.0)
    slower = plan_budget(n_train=1200, n_classes=4, n_images=1500, forward_ms=15.0)
    assert small.seconds < larger.seconds and small.seconds < slower.seconds
    # Each candidate's first 2 epochs, then the leader on to the recipe's 10.
    assert race_epochs(2, 2) == 12 and race_epochs(2, 2, 4) == 6 and race_epochs(0, 2) == 0


def test_an_explicit_time_budget_wins(tmp_path: Path) -> None:
    config = TrainConfig(tmp_path, tmp_path, "m", strategy="auto", time_budget=42.0)
    assert config.budget(gpu=False) == 42.0 and config.budget(gpu=True) == 42.0
    default = TrainConfig(tmp_path, tmp_path, "m", strategy="auto")
    assert default.budget(gpu=False) is None  # sized to the data by train()
    assert TrainConfig(tmp_path, tmp_path, "m").budget(gpu=False) is None  # linear: no limit
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(tmp_path, tmp_path, "m", time_budget=0)


@pytest.mark.slow
def test_train_prints_the_default_budget_and_the_report_keeps_its_rule(
    shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlserve.training.train")
    result = train(
        shapes_folder,
        model_repository=tmp_path / "models",
        name="budget",
        strategy="auto",
        backbone=TINY_BACKBONE,
        workers=0,
        cache=False,
        options={"trained": (), "trees": False},
    )
    said = [r.getMessage() for r in caplog.records if "auto's default for this data" in r.message]
    assert said and "no trained candidate asked for" in said[0]
    report = json.loads((result.version_dir / "report.json").read_text())
    assert report["time_budget"] > 0 and "frozen heads and geometry" in report["budget_rule"]
    assert "Time budget" in (result.version_dir / "report.md").read_text()
