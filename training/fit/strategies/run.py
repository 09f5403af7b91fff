"""One backbone-training run that can be advanced epoch by epoch, stopped early, and resumed.

``finetune`` and ``scratch`` build a :class:`BackboneRun` and advance it to the
end; ``auto`` advances several a little at a time and keeps only the leaders
(successive halving). After every epoch the run scores its validation images
(:mod:`~tlserve.training.fit.strategies.validation`); :meth:`BackboneRun.finish`
restores the best epoch, not the last, of the raw weights or of their moving
average, whichever scored better
(:mod:`~tlserve.training.fit.strategies.averaging`).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch

from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.fit.loops import (
    Augment,
    OutOfTime,
    augment_for,
    cosine_schedule,
    measured_precision,
    rank_and_world,
    train_one_epoch,
)
from tlserve.training.fit.lr_finder import suggest_lr
from tlserve.training.fit.precision import training_device
from tlserve.training.fit.strategies.averaging import BestWeights
from tlserve.training.fit.strategies.base import FitContext, FittedHead, HeldOutLogits
from tlserve.training.fit.strategies.checkpoint import load_checkpoint, save_checkpoint
from tlserve.training.fit.strategies.network import (
    Network,
    loss_function,
    param_groups,
    probe_head,
    reset_parameters,
)
from tlserve.training.fit.strategies.recipe import Recipe
from tlserve.training.fit.strategies.validation import EarlyStopping, PreparedImages

__all__ = ["BackboneRun"]

log = logging.getLogger(__name__)


class BackboneRun:
    """A ``finetune``/``scratch`` run on ``data``, advanced with :meth:`advance`.

    The head starts from the linear probe fitted on the frozen features of
    the same training images (``recipe.probe_head``; ``probe_c`` skips its CV
    when the strength is already known), then the backbone trains with
    AdamW, timm's layer-wise decayed param groups and its cosine schedule
    planned over ``recipe.epochs``.
    """

    def __init__(
        self,
        recipe: Recipe,
        context: FitContext,
        data: PreparedImages,
        *,
        probe_c: float | None = None,
    ) -> None:
        if recipe.bn not in ("frozen", "train"):
            raise ValueError(f"bn must be 'frozen' or 'train', got {recipe.bn!r}")
        self.recipe, self.context, self.data = recipe, context, data
        spec = context.backbone.preprocessing
        module = copy.deepcopy(context.backbone.module)
        if not recipe.pretrained:
            reset_parameters(module)
        self.params: dict[str, float | int | str] = {"max_epochs": recipe.epochs, "bn": recipe.bn}
        head, probe_c = probe_head(context, data, recipe, probe_c)
        if probe_c is not None:
            self.params["probe_C"] = probe_c
        self.device = training_device()
        self.network = Network(ImageEmbedder(module, spec), head).to(self.device)
        groups, self.frozen = param_groups(self.network, recipe)
        self.params["trainable_parameters"] = sum(p.numel() for g in groups for p in g["params"])
        self.loss_fn = loss_function(context, data.labels, recipe, self.device)
        kind = augment_for(recipe.augment, data.images[:64])
        self.params["augment"] = kind
        self.augment = Augment((spec.height, spec.width), kind=kind)
        size = context.batch_size
        self.precision, why = measured_precision(
            self.network, data.images[:size], data.labels[:size], recipe.precision,
            loss_fn=self.loss_fn, set_modes=self._set_modes,
        )  # fmt: skip
        self.params["precision"] = f"{self.precision} on {self.device.type} ({why})"
        self.model: torch.nn.Module = self.network
        if rank_and_world()[1] > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids=ids)
        self.lr_curve: list[tuple[float, float]] = []
        lr = self._learning_rate(groups)
        self.params["lr"] = float(f"{lr:.3g}")
        # Each group's lr is the base rate: timm's scheduler multiplies its lr_scale in.
        self.optimizer = torch.optim.AdamW(
            [{**g, "lr": lr} for g in groups], weight_decay=recipe.weight_decay
        )
        self.steps_per_epoch = max(1, len(data.images) // rank_and_world()[1] // context.batch_size)
        total = self.steps_per_epoch * recipe.epochs
        self.scheduler = cosine_schedule(self.optimizer, total, int(recipe.warmup_fraction * total))
        self.best = BestWeights(
            self.network,
            recipe.patience,
            average=recipe.weight_average,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.history: list[dict[str, float]] = []
        self.epochs_done = 0
        self.stopped_early = self.out_of_time = False
        self.train_seconds = 0.0
        self.images_per_second: float | None = None
        self.planned_epochs = recipe.epochs
        if context.checkpoint_dir is not None and context.resume:
            self._resume()
        if probe_c is not None and not self.epochs_done and len(data.val_labels):
            # Epoch 0 is the probe itself: a fine-tune that never beats it on
            # validation ends as the probe, not as a worse network.
            start: dict[str, float] = {}
            self.best.score(0, self.network, data, start)
            self.params["probe_val_accuracy"] = round(start["val_accuracy"], 6)
            log.info("%s epoch 0 (the probe): %s", recipe.name, start)

    @property
    def stopper(self) -> EarlyStopping:
        """The early stopping of the weights the run keeps (the average's if it scored better)."""
        return self.best.kept

    def _set_modes(self) -> None:
        self.network.train()
        for sub in self.network.embedder.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and (
                self.recipe.bn == "frozen" or sub in self.frozen
            ):
                sub.eval()

    def _learning_rate(self, groups: list[dict[str, Any]]) -> float:
        if self.recipe.lr != "auto":
            return float(self.recipe.lr)
        lr, self.lr_curve = suggest_lr(
            self.model, groups, self.data.images, self.data.labels, self.recipe.weight_decay,
            loss_fn=self.loss_fn, augment=self.augment, batch_size=self.context.batch_size,
            seed=self.context.seed, set_modes=self._set_modes,
        )  # fmt: skip
        return lr

    @property
    def done(self) -> bool:
        return self.stopped_early or self.out_of_time or self.epochs_done >= self.planned_epochs

    @property
    def epoch_seconds(self) -> float | None:
        """Measured seconds per epoch (training and validation), None before the first."""
        return self.train_seconds / self.epochs_done if self.epochs_done else None

    def advance(self, epochs: int, deadline: float | None = None) -> None:
        """Up to ``epochs`` more epochs; stops early, at the planned end, or before ``deadline``."""
        for _ in range(epochs):
            if self.done:
                return
            try:
                self._one_epoch(deadline)
                if deadline is not None:
                    self._fit_schedule(deadline)
            except OutOfTime as exc:
                self.out_of_time = True
                self.images_per_second = exc.images_per_second
                log.info(
                    "%s: epoch %d stopped, %.0f s more would pass the time budget",
                    self.recipe.name,
                    self.epochs_done + 1,
                    exc.projected_seconds,
                )

    def _fit_schedule(self, deadline: float) -> None:
        """Shorten the cosine schedule to the epochs that fit before ``deadline`` at the
        measured pace, so a budget ends on a low learning rate, not midway down."""
        pace = self.epoch_seconds or float("inf")
        fit = self.epochs_done + int(max(0.0, deadline - time.monotonic()) // pace)
        if self.epochs_done < fit < self.planned_epochs:
            self.planned_epochs = fit
            self.params["planned_epochs"] = fit
            self.scheduler.t_initial = max(
                1, fit * self.steps_per_epoch - int(self.scheduler.warmup_t)
            )
            log.info("%s: schedule shortened to %d epochs (time budget)", self.recipe.name, fit)

    def _one_epoch(self, deadline: float | None) -> None:
        start = time.perf_counter()
        epoch = self.epochs_done
        stats = train_one_epoch(
            self.model,
            self.optimizer,
            self.scheduler,
            self.data.images,
            self.data.labels,
            loss_fn=self.loss_fn,
            augment=self.augment,
            batch_size=self.context.batch_size,
            seed=self.context.seed * 1000 + epoch,
            set_modes=self._set_modes,
            epoch_label=f"{self.recipe.name} epoch {epoch + 1}/{self.planned_epochs}",
            steps_done=epoch * self.steps_per_epoch,
            deadline=deadline,
            precision=self.precision,
            after_step=lambda: self.best.after_step(self.network),
        )
        self.images_per_second = stats.images_per_second
        row = {
            "epoch": float(epoch + 1),
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "lr": float(self.optimizer.param_groups[-1]["lr"]),
            "seconds": stats.seconds,
        }
        self.epochs_done += 1
        if len(self.data.val_labels):
            no_gain = self.best.score(epoch + 1, self.network, self.data, row)
            # Not before half the schedule: validation dips while the LR is high
            # and recovers as it anneals (fashion-medium: 82 → 70 → 80 → 76 %).
            self.stopped_early = no_gain and 2 * self.epochs_done >= self.planned_epochs
        self.history.append(row)
        self.train_seconds += time.perf_counter() - start
        log.info(
            "%s epoch %d/%d: %s",
            self.recipe.name,
            epoch + 1,
            self.planned_epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
        )
        if self.context.checkpoint_dir is not None and rank_and_world()[0] == 0:
            save_checkpoint(
                self.context.checkpoint_dir,
                self.network,
                self.optimizer,
                self.scheduler,
                self.epochs_done,
                self.history,
                extra={**self.best.state(), "stopped_early": self.stopped_early},
            )

    def _resume(self) -> None:
        assert self.context.checkpoint_dir is not None
        state = load_checkpoint(
            self.context.checkpoint_dir, self.network, self.optimizer, self.scheduler
        )
        if state is None:
            return
        self.epochs_done, self.history, extra = state
        self.best.load(extra)
        self.stopped_early = bool(extra.get("stopped_early", False))
        self.params["resumed_from_epoch"] = self.epochs_done

    def val_correct(self) -> np.ndarray:
        """Which validation images the best epoch got right."""
        if self.stopper.best_logits is None:
            return np.zeros(len(self.data.val_labels), dtype=bool)
        return np.asarray(self.stopper.best_logits.argmax(1) == self.data.val_labels)

    def finish(self) -> FittedHead:
        """The best epoch's network (restored), as a strategy result."""
        self.stopper.restore(self.network)
        self.network.eval().cpu()  # exported and checked on the CPU
        params = {**self.params, **self.best.params()}
        params["epochs"] = self.epochs_done
        if self.stopper.best_state is not None:
            params["best_epoch"] = self.stopper.best_epoch
            params["val_accuracy"] = round(self.stopper.best_accuracy, 6)
        if self.stopped_early:
            params["stopped"] = f"no gain for {self.recipe.patience} epochs"
        elif self.out_of_time:
            params["stopped"] = "time budget"
        calibration = None
        if self.data.carved and self.stopper.best_logits is not None:
            # train() has no val/ to calibrate on: give the held-out slice's logits.
            calibration = HeldOutLogits(
                self.stopper.best_logits,
                self.data.val_labels,
                "validation images held out of train/",
            )
            params["val_images"] = len(self.data.val_labels)
        return FittedHead(
            head=self.network.head,
            embedder=self.network.embedder,
            strategy=self.recipe.name,
            trained_backbone=True,
            params=params,
            history=self.history,
            calibration=calibration,
            skipped=self.data.skipped,
            lr_curve=self.lr_curve,
            val_images=len(self.data.val_labels) if self.data.carved else 0,
        )
