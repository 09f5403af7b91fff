"""auto's decision: the measured best wins, ties go to the cheaper, budgets hold, best epoch."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.shapes import TINY_BACKBONE
from tlserve.training import TrainConfig, train
from tlserve.training.fit.selection import Score, paired_difference, select, wilson_interval
from tlserve.training.fit.strategies import FitContext
from tlserve.training.fit.strategies.finetune import FineTune
from tlserve.training.fit.strategies.linear import fit_logistic_regression
from tlserve.training.fit.strategies.run import BackboneRun
from tlserve.training.fit.strategies.validation import EarlyStopping, prepare_run_images, validate


def _score(name: str, correct: np.ndarray, cost: float, rows: list[str] | None = None) -> Score:
    rows = rows or [f"img{i}" for i in range(len(correct))]
    return Score(name=name, rows=tuple(rows), correct=correct.astype(bool), cost=cost)


def test_selection_picks_the_measured_best_on_synthetic_features() -> None:
    # Two feature sets for the same 300 images: only the second carries the class.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 100)
    noise = rng.normal(size=(300, 8)).astype(np.float32)
    signal = (np.eye(3)[labels] @ rng.normal(0, 2.0, (3, 8)) + rng.normal(size=(300, 8))).astype(
        np.float32
    )
    rows = [f"img{i}" for i in range(300)]
    scores = []
    for name, features, cost in (("noise", noise, 1.0), ("signal", signal, 2.0)):
        fit = fit_logistic_regression(features, labels, classes=("a", "b", "c"), folds=5)
        assert fit.oof_logits is not None and fit.oof_logits.shape == (300, 3)
        scores.append(_score(name, fit.oof_logits.argmax(1) == labels, cost, rows))
    chosen = select(scores)
    assert chosen.winner.name == "signal" and chosen.leader.name == "signal"
    assert chosen.winner.accuracy > 0.8 > 0.5 > scores[0].accuracy
    assert "signal scored best" in chosen.reason and "vs noise" in chosen.reason


def test_a_combination_within_noise_of_its_tier_s_leader_stands_for_the_tier() -> None:
    rng = np.random.default_rng(2)
    stage = rng.random(200) < 0.9
    multi = stage.copy()  # 11 rows lost and 9 won of 200: a point, inside the noise
    multi[np.flatnonzero(stage)[:11]] = False
    multi[np.flatnonzero(~stage)[:9]] = True
    last = stage.copy()
    last[np.flatnonzero(stage)[:30]] = False  # 15 points worse: measurably so
    scores = [
        _score("linear", last, 1.0),
        _score("linear@-2", stage, 1.1),
        dataclasses.replace(_score("linear@multi", multi, 1.2), combines=True),
    ]
    chosen = select(scores)
    assert chosen.leader.name == "linear@-2" and chosen.winner.name == "linear@multi"
    assert "combines the near-tied heads" in chosen.reason
    # Measurably worse than the leader, the combination is not taken.
    far = stage.copy()
    far[np.flatnonzero(stage)[:25]] = False
    far[np.flatnonzero(~stage)[:5]] = True
    scores[2] = dataclasses.replace(scores[2], correct=far)
    assert select(scores).winner.name == "linear@-2"
    # A candidate that does not combine is never preferred for being close.
    scores[2] = _score("linear@-3", multi, 1.1)
    assert select(scores).winner.name == "linear@-2"


def test_ties_within_one_standard_error_go_to_the_cheaper_candidate() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.85
    close = base.copy()  # disagrees on 18 rows, 10 lost and 8 won: half a point, noise
    close[np.flatnonzero(base)[:10]] = False
    close[np.flatnonzero(~base)[:8]] = True
    chosen = select([_score("pricey", base, 3.0), _score("cheap", close, 1.0)])
    assert chosen.leader.name == "pricey" and chosen.winner.name == "cheap"
    assert "within one standard error" in chosen.reason
    # The same tier (linear heads on two layers of one backbone): the leader wins.
    same_tier = select([_score("linear@multi", base, 1.2), _score("linear", close, 1.0)])
    assert same_tier.winner.name == "linear@multi" == same_tier.leader.name
    worse = base.copy()
    worse[np.flatnonzero(base)[:60]] = False  # 15 points worse: measurably so
    assert select([_score("pricey", base, 3.0), _score("cheap", worse, 1.0)]).winner.name == (
        "pricey"
    )
    # A trained backbone leads on a small slice; the cheaper tier is represented by
    # its best head, not its cheapest: the last layer 7 points below stage -2 on
    # every row was picked here once (sklearn digits: 83.7% on test against 91.2%).
    rows = [f"img{i}" for i in range(200)]
    index = np.arange(200)
    last = _score("linear", (index != 0) & ((index < 30) | (index % 6 != 0)), 1.0, rows)  # 85.5%
    stage = _score("linear@-2", np.arange(200) % 16 != 0, 1.1, rows)  # 93.75%
    trained = _score("finetune", np.arange(30) != 5, 3.0, rows[:30])  # 96.7% on 30 rows
    chosen = select([last, stage, trained])
    assert chosen.leader.name == "finetune" and chosen.winner.name == "linear@-2"
    # Paired on common rows only: a slice scored model vs an out-of-fold one.
    slice_rows = [f"img{i}" for i in range(0, 400, 4)]
    trained = _score("trained", np.ones(100), 3.0, slice_rows)
    diff, se, n = paired_difference(trained, _score("oof", base, 1.0))
    assert n == 100 and diff == pytest.approx(1 - base[::4].mean()) and se > 0
    low, high = wilson_interval(85, 100)
    assert low < 0.85 < high and low >= 0.0 and high <= 1.0


@pytest.mark.slow
def test_a_tiny_budget_stops_after_the_cheap_candidates(
    shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tlserve.training.fit.strategies.auto")
    result = train(
        TrainConfig(
            shapes_folder,
            model_repository=tmp_path / "models",
            name="tiny",
            strategy="auto",
            backbone=TINY_BACKBONE,
            workers=0,
            cache=False,
            time_budget=1.0,
        )
    )
    names = {s.name for s in result.candidates}
    assert {"linear", "linear@-2", "linear@multi"} <= names
    assert not names & {"finetune", "scratch", "trees"}
    assert "Time budget spent after the cheap candidates" in result.reason
    assert "finetune, scratch not tried" in result.reason and "--time-budget" in result.reason
    assert any("s left]" in message for message in caplog.messages)  # progress shows time left
    assert result.strategy == "linear"


def test_early_stopping_restores_the_best_epoch(shapes_context: FitContext) -> None:
    network = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2)
    logits = np.zeros((1, 2))
    states = []
    for epoch, accuracy in enumerate([0.5, 0.8, 0.7, 0.6], start=1):
        with torch.no_grad():
            network.weight.fill_(float(epoch))
        states.append(network.weight.clone())
        stop = stopper.update(epoch, accuracy, 1.0, network, logits)
        assert stop == (epoch == 4)  # two epochs without gain after the best (epoch 2)
    stopper.restore(network)
    assert stopper.best_epoch == 2 and torch.equal(network.weight, states[1])

    # A real run: what finish() hands back scores exactly as the weights it kept did
    # (the best epoch's, or their moving average's where that scored better), and
    # no worse than any epoch's own weights.
    context = shapes_context
    recipe = FineTune(epochs=4, lr=0.05, augment="none", patience=4)
    run = BackboneRun(recipe, context, prepare_run_images(context, 0.3))
    run.advance(4)
    fitted = run.finish()
    history = [row["val_accuracy"] for row in fitted.history]
    assert len(history) == 4 and 0 <= int(fitted.params["best_epoch"]) <= 4
    kept = float(fitted.params["val_accuracy"])
    assert kept >= max(history) - 1e-6
    accuracy, _, _ = validate(run.network, run.data)
    assert accuracy == pytest.approx(kept, abs=1e-6)
    assert fitted.calibration is not None and fitted.val_images == len(run.data.val_labels)


def test_a_deadline_stops_training_before_an_epoch_that_would_pass_it(
    shapes_context: FitContext,
) -> None:
    context = dataclasses.replace(
        shapes_context,
        batch_size=4,
        deadline=time.monotonic() - 1.0,  # already spent
    )
    fitted = FineTune(epochs=3, augment="none").fit(context)
    assert fitted.history == [] and fitted.params["stopped"] == "time budget"
