"""The fine-tune recipe: probe head, early stopping to the best epoch, the weight average.

The average is scored beside the raw weights on the same validation images
every epoch and kept only when its best epoch scores better.
"""

from __future__ import annotations

import time

import pytest
import torch

from tlserve.training.fit.strategies import FitContext
from tlserve.training.fit.strategies.averaging import WeightAverage
from tlserve.training.fit.strategies.finetune import FineTune
from tlserve.training.fit.strategies.run import BackboneRun
from tlserve.training.fit.strategies.validation import EarlyStopping, prepare_run_images


def test_the_average_follows_the_weights_with_a_half_life_in_steps() -> None:
    network = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(network.weight)
    average = WeightAverage(network, half_life=4)
    assert average.decay == pytest.approx(0.5**0.25)
    torch.nn.init.ones_(network.weight)
    for _ in range(200):  # long past the warm-up: the average reaches the weights
        average.update(network)
    torch.testing.assert_close(average.module.weight, network.weight)
    # From here, one half-life of steps halves the distance to new weights.
    torch.nn.init.constant_(network.weight, 3.0)
    for _ in range(4):
        average.update(network)
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), 2.0))
    assert not any(p.requires_grad for p in average.module.parameters())


def test_the_run_keeps_whichever_weights_scored_better(shapes_context: FitContext) -> None:
    recipe = FineTune(epochs=1, lr=0.05, augment="none", probe_head=False)
    run = BackboneRun(recipe, shapes_context, prepare_run_images(shapes_context, 0.3))
    best = run.best
    assert best.average is not None and best.average_stopping is not None
    state = {"w": torch.zeros(1)}
    best.raw = EarlyStopping(best_epoch=3, best_accuracy=0.8, best_loss=0.5, best_state=state)
    best.average_stopping = EarlyStopping(
        best_epoch=4, best_accuracy=0.8, best_loss=0.6, best_state=state
    )
    assert run.stopper is best.raw  # a tie in accuracy goes to the lower loss
    best.average_stopping.best_loss = 0.4
    assert run.stopper is best.average_stopping
    best.average_stopping.best_accuracy = 0.7
    assert run.stopper is best.raw


def test_a_finetune_scores_both_and_reports_the_one_it_kept(shapes_context: FitContext) -> None:
    fitted = FineTune(epochs=2, lr=0.05, augment="none").fit(shapes_context)
    assert {"val_accuracy", "ema_val_accuracy"} <= set(fitted.history[0])
    params = fitted.params
    raw, ema = float(params["raw_val_accuracy"]), float(params["ema_val_accuracy"])
    assert params["weights"] in ("raw", "ema")
    kept = ema if params["weights"] == "ema" else raw
    assert float(params["val_accuracy"]) == kept == max(raw, ema)
    assert "probe_C" in params  # the head started from the linear probe...
    # ...which is epoch 0: the network kept never scored below it on validation.
    assert float(params["val_accuracy"]) >= float(params["probe_val_accuracy"])


def test_a_time_budget_ends_the_schedule_on_a_low_learning_rate(
    shapes_context: FitContext,
) -> None:
    recipe = FineTune(epochs=10, lr=0.05, augment="none", probe_head=False)
    run = BackboneRun(recipe, shapes_context, prepare_run_images(shapes_context, 0.3))
    run.epochs_done, run.train_seconds = 1, 10.0  # as if one epoch took 10 s
    run._fit_schedule(time.monotonic() + 35.5)  # three more fit
    assert run.planned_epochs == 4 and run.params["planned_epochs"] == 4
    last_step = 4 * run.steps_per_epoch
    assert run.scheduler._get_lr(last_step)[0] < 0.01 * 0.05
    assert run.scheduler._get_lr(run.steps_per_epoch)[0] > 0.5 * 0.05


def test_without_the_average_nothing_about_it_is_reported(shapes_context: FitContext) -> None:
    recipe = FineTune(epochs=1, augment="none", probe_head=False, weight_average="none")
    fitted = recipe.fit(shapes_context)
    assert "weights" not in fitted.params and "ema_val_accuracy" not in fitted.history[0]
    with pytest.raises(ValueError, match="weight_average must be"):
        FineTune(weight_average="swa").fit(shapes_context)


def test_a_fine_tune_that_never_beats_the_probe_ends_as_the_probe_after_half_its_schedule(
    shapes_context: FitContext,
) -> None:
    # lr 0 (and no warm-up from 1e-7): no epoch can beat epoch 0; patience 1
    # would stop after epoch 1, but early stopping waits for half the schedule.
    recipe = FineTune(epochs=6, patience=1, lr=0.0, warmup_fraction=0.0, augment="none")
    fitted = recipe.fit(shapes_context)
    assert len(fitted.history) == 3
    assert fitted.params["best_epoch"] == 0
    assert str(fitted.params["stopped"]).startswith("no gain")
    assert fitted.params["val_accuracy"] == fitted.params["probe_val_accuracy"]
