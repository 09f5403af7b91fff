"""One backbone-training run that can be advanced epoch by epoch, stopped early, and resumed.

``finetune`` and ``scratch`` build a :class:`BackboneRun` and advance it to the
end; ``auto`` advances several a little at a time and keeps only the leaders
(successive halving). After every epoch the run scores its validation images
(:mod:`~tlserve.training.fit.strategies.validation`); :meth:`BackboneRun.finish`
restores the best epoch, not the last.
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
    find_lr,
    rank_and_world,
    train_one_epoch,
)
from tlserve.training.fit.precision import resolve_precision, training_device
from tlserve.training.fit.strategies.base import (
    FitContext,
    FittedHead,
    HeldOutLogits,
    class_weights,
)
from tlserve.training.fit.strategies.checkpoint import load_checkpoint, save_checkpoint
from tlserve.training.fit.strategies.linear import fit_logistic_regression
from tlserve.training.fit.strategies.network import Network, param_groups, reset_parameters
from tlserve.training.fit.strategies.recipe import Recipe
from tlserve.training.fit.strategies.validation import EarlyStopping, PreparedImages, validate

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
        head = self._head(probe_c)
        self.device = training_device()
        self.precision = resolve_precision(recipe.precision, self.device)
        self.params["precision"] = f"{self.precision} on {self.device.type}"
        self.network = Network(ImageEmbedder(module, spec), head).to(self.device)
        groups, self.frozen = param_groups(self.network, recipe)
        self.params["trainable_parameters"] = sum(p.numel() for g in groups for p in g["params"])
        n_classes = len(context.classes)
        weight = (
            torch.tensor(class_weights(data.labels, n_classes), dtype=torch.float32)
            if context.balanced
            else None
        )
        self.loss_fn = torch.nn.CrossEntropyLoss(
            weight=None if weight is None else weight.to(self.device),
            label_smoothing=recipe.label_smoothing,
        )
        kind = augment_for(recipe.augment, data.images[:64])
        self.params["augment"] = kind
        self.augment = Augment((spec.height, spec.width), kind=kind)
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
        self.stopper = EarlyStopping(recipe.patience)
        self.history: list[dict[str, float]] = []
        self.epochs_done = 0
        self.stopped_early = self.out_of_time = False
        self.train_seconds = 0.0
        self.images_per_second: float | None = None
        if context.checkpoint_dir is not None and context.resume:
            self._resume()

    def _head(self, probe_c: float | None) -> torch.nn.Module:
        context = self.context
        if not (self.recipe.probe_head and self.recipe.pretrained):
            return torch.nn.Linear(context.backbone.feature_dim, len(context.classes))
        train = context.features("train")
        val = set(self.data.val_rows)
        keep = np.array([str(p) not in val for p in train.paths], dtype=bool)
        probe = fit_logistic_regression(
            train.embeddings[keep],
            train.labels[keep],
            classes=context.classes,
            c_grid=(probe_c,) if probe_c is not None else (0.001, 0.01, 0.1, 1.0, 10.0),
            folds=5 if probe_c is None else 0,
            seed=context.seed,
            balanced=context.balanced,
        )
        self.params["probe_C"] = probe.c if probe_c is None else probe_c
        return probe.linear.train()

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
        scaled = [{**g, "lr": float(g["lr_scale"])} for g in groups]
        finder = torch.optim.AdamW(scaled, weight_decay=self.recipe.weight_decay)
        lr, self.lr_curve = find_lr(
            self.model,
            finder,
            self.data.images,
            self.data.labels,
            loss_fn=self.loss_fn,
            augment=self.augment,
            batch_size=self.context.batch_size,
            seed=self.context.seed,
            set_modes=self._set_modes,
        )
        log.info("LR finder suggests lr=%.2g", lr)
        return lr

    @property
    def done(self) -> bool:
        return self.stopped_early or self.out_of_time or self.epochs_done >= self.recipe.epochs

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
            except OutOfTime as exc:
                self.out_of_time = True
                self.images_per_second = exc.images_per_second
                log.info(
                    "%s: epoch %d stopped, %.0f s more would pass the time budget",
                    self.recipe.name,
                    self.epochs_done + 1,
                    exc.projected_seconds,
                )

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
            epoch_label=f"{self.recipe.name} epoch {epoch + 1}/{self.recipe.epochs}",
            steps_done=epoch * self.steps_per_epoch,
            deadline=deadline,
            precision=self.precision,
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
            accuracy, loss, logits = validate(self.network, self.data)
            row["val_loss"], row["val_accuracy"] = loss, accuracy
            self.stopped_early = self.stopper.update(
                epoch + 1, accuracy, loss, self.network, logits
            )
        self.history.append(row)
        self.train_seconds += time.perf_counter() - start
        log.info(
            "%s epoch %d/%d: %s",
            self.recipe.name,
            epoch + 1,
            self.recipe.epochs,
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
                extra={"stopper": self.stopper.state(), "stopped_early": self.stopped_early},
            )

    def _resume(self) -> None:
        assert self.context.checkpoint_dir is not None
        state = load_checkpoint(
            self.context.checkpoint_dir, self.network, self.optimizer, self.scheduler
        )
        if state is None:
            return
        self.epochs_done, self.history, extra = state
        self.stopper.load(extra.get("stopper", {}))
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
        params = dict(self.params)
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
