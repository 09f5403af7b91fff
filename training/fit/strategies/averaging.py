"""The weights a backbone-training run keeps: the best epoch of the raw weights or of their average.

With ``weight_average="ema"`` a run keeps an exponential moving average of its
weights (:class:`WeightAverage`, updated after every optimiser step) and
scores it on the same validation images as the raw weights after every
epoch, each with its own early stopping (:class:`BestWeights`). The run ends
when neither has improved for ``patience`` epochs and keeps the average only
if its best epoch scored better (accuracy, then loss) than the raw weights'
best: averaging is a candidate that has to measure better, not a rule.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from tlserve.training.fit.strategies.validation import EarlyStopping, PreparedImages, validate

__all__ = ["BestWeights", "WeightAverage"]


class WeightAverage:
    """Exponential moving average of a network's weights (and buffers), after every step.

    ``half_life`` is in optimiser steps: a run sets it to one epoch, so the
    average spans the last epoch or two and never reaches back to weights
    early stopping would already have left behind (timm's ImageNet decay,
    0.9998, spans thousands of steps; a medium dataset has tens per epoch).
    The decay warms up as ``(1 + t) / (10 + t)`` so the first steps do not
    pin the average to the starting weights.
    """

    def __init__(self, network: torch.nn.Module, half_life: float) -> None:
        self.module = copy.deepcopy(network).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = 0.5 ** (1.0 / max(half_life, 1.0))
        self.steps = 0

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        averaged = self.module.state_dict()
        for name, value in network.state_dict().items():
            target = averaged[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.device), 1.0 - decay)
            else:
                target.copy_(value)


class BestWeights:
    """Early stopping of the raw weights and, when ``average="ema"``, of their moving average."""

    def __init__(
        self, network: torch.nn.Module, patience: int, *, average: str, steps_per_epoch: int
    ) -> None:
        if average not in ("ema", "none"):
            raise ValueError(f"weight_average must be 'ema' or 'none', got {average!r}")
        self.raw = EarlyStopping(patience)
        ema = average == "ema"
        self.average = WeightAverage(network, steps_per_epoch) if ema else None
        self.average_stopping = EarlyStopping(patience) if ema else None

    def after_step(self, network: torch.nn.Module) -> None:
        if self.average is not None:
            self.average.update(network)

    def score(
        self, epoch: int, network: torch.nn.Module, data: PreparedImages, row: dict[str, float]
    ) -> bool:
        """Score both after ``epoch`` (into ``row``); True when neither is improving."""
        accuracy, loss, logits = validate(network, data)
        row["val_loss"], row["val_accuracy"] = loss, accuracy
        stop = self.raw.update(epoch, accuracy, loss, network, logits)
        if self.average is not None and self.average_stopping is not None:
            accuracy, loss, logits = validate(self.average.module, data)
            row["ema_val_loss"], row["ema_val_accuracy"] = loss, accuracy
            average_done = self.average_stopping.update(
                epoch, accuracy, loss, self.average.module, logits
            )
            stop = stop and average_done
        return stop

    @property
    def kept(self) -> EarlyStopping:
        """The raw weights' early stopping, or the average's where its best scored better."""
        average, raw = self.average_stopping, self.raw
        if average is None or average.best_state is None:
            return raw
        better = average.best_accuracy > raw.best_accuracy or (
            average.best_accuracy == raw.best_accuracy and average.best_loss < raw.best_loss
        )
        return average if better else raw

    def params(self) -> dict[str, float | int | str]:
        """Which weights were kept and both best validation accuracies (with an average)."""
        if self.average_stopping is None or self.average_stopping.best_state is None:
            return {}
        return {
            "weights": "ema" if self.kept is self.average_stopping else "raw",
            "raw_val_accuracy": round(self.raw.best_accuracy, 6),
            "ema_val_accuracy": round(self.average_stopping.best_accuracy, 6),
        }

    def state(self) -> dict[str, Any]:
        """For the checkpoint: both early stoppings and the average's weights."""
        state: dict[str, Any] = {"stopper": self.raw.state()}
        if self.average is not None and self.average_stopping is not None:
            state["average"] = {
                "module": self.average.module.state_dict(),
                "steps": self.average.steps,
            }
            state["average_stopper"] = self.average_stopping.state()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.raw.load(state.get("stopper", {}))
        saved = state.get("average")
        if self.average is not None and self.average_stopping is not None and saved:
            self.average.module.load_state_dict(saved["module"])
            self.average.steps = int(saved["steps"])
            self.average_stopping.load(state.get("average_stopper", {}))
