"""Train the backbone: ``finetune`` (new head, then unfreeze) and ``scratch`` (everything).

``finetune`` follows the linear-probe-then-fine-tune recipe: the new head is
first fitted with the backbone frozen (the ``linear`` probe on cached
features, so the random head never sends large gradients into pretrained
layers — Keras's warning), then the last ``unfreeze`` layer groups (or all)
train with AdamW, warmup + cosine, discriminative LRs (head ``lr``; backbone
``lr * backbone_lr_mult``, decaying by ``layer_decay`` per layer group towards
the stem, timm's layer-wise decay), optional label smoothing and light
augmentation. BatchNorm policy: ``bn="frozen"`` (default for ``finetune``)
keeps every BatchNorm on its pretrained running statistics (Keras's
inference-mode BN); ``"train"`` updates them in the unfrozen layers. Frozen
layers' BatchNorm always stays in eval mode.

``scratch`` trains the whole network at one LR with BatchNorm training, from
the pretrained weights (default) or from random init (``pretrained=False``).

Both run under ``torchrun`` unchanged: with a process group initialised the
model is wrapped in DistributedDataParallel and each rank trains on its slice.
A checkpoint is written every epoch; ``resume`` continues from it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from timm.optim._param_groups import param_groups_layer_decay

from tlserve.training.data import Sample, split_samples
from tlserve.training.features import prepare_images
from tlserve.training.loops import (
    Augment,
    evaluate_logits,
    find_lr,
    rank_and_world,
    train_one_epoch,
    warmup_cosine,
)
from tlserve.training.modules import ImageEmbedder
from tlserve.training.strategies.base import FitContext, FittedHead, class_weights
from tlserve.training.strategies.checkpoint import load_checkpoint, save_checkpoint
from tlserve.training.strategies.linear import fit_logistic_regression

__all__ = ["FineTune", "Scratch"]

log = logging.getLogger(__name__)


class _Network(torch.nn.Module):
    def __init__(self, embedder: ImageEmbedder, head: torch.nn.Module) -> None:
        super().__init__()
        self.embedder = embedder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.embedder(images))
        return logits


@dataclass
class FineTune:
    """Strategy ``finetune``: probe the head, then unfreeze with discriminative LRs."""

    name: ClassVar[str] = "finetune"
    epochs: int = 3
    lr: float | str = 1e-3
    backbone_lr_mult: float = 0.1
    layer_decay: float = 0.75
    unfreeze: int | str = "all"
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    augment: str = "light"
    bn: str = "frozen"
    probe_head: bool = True
    pretrained: bool = True
    val_fraction: float = 0.15  # carved from train when there is no val/

    def fit(self, context: FitContext) -> FittedHead:
        if self.bn not in ("frozen", "train"):
            raise ValueError(f"bn must be 'frozen' or 'train', got {self.bn!r}")
        spec = context.backbone.preprocessing
        n_classes = len(context.classes)
        module = copy.deepcopy(context.backbone.module)
        if not self.pretrained:
            _reset_parameters(module)
        embedder = ImageEmbedder(module, spec)
        params: dict[str, float | int | str] = {"epochs": self.epochs, "bn": self.bn}
        train_samples, val_samples, carved = self._split(context)
        if self.probe_head and self.pretrained:
            train = context.features("train")
            keep = np.isin(
                np.array([str(p) for p in train.paths]), [str(p) for p, _ in train_samples]
            )
            probe = fit_logistic_regression(
                train.embeddings[keep],
                train.labels[keep],
                classes=context.classes,
                seed=context.seed,
                balanced=context.balanced,
            )
            head: torch.nn.Module = probe.linear.train()
            params["probe_C"] = probe.c
        else:
            head = torch.nn.Linear(context.backbone.feature_dim, n_classes)
        network = _Network(embedder, head)
        groups, frozen = self._param_groups(network)
        params["trainable_parameters"] = sum(p.numel() for g in groups for p in g["params"])

        images, labels, skipped = prepare_images(train_samples, spec, workers=context.workers)
        val_images, val_labels, val_skipped = (
            prepare_images(val_samples, spec, workers=context.workers)
            if val_samples
            else (np.zeros((0,)), np.zeros((0,), np.int64), ())
        )
        weight = (
            torch.tensor(class_weights(labels, n_classes), dtype=torch.float32)
            if context.balanced
            else None
        )
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=self.label_smoothing)
        augment = Augment((spec.height, spec.width), kind=self.augment)
        model: torch.nn.Module = network
        if rank_and_world()[1] > 1:
            model = torch.nn.parallel.DistributedDataParallel(network)

        def set_modes() -> None:
            network.train()
            for sub in network.embedder.modules():
                if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and (
                    self.bn == "frozen" or sub in frozen
                ):
                    sub.eval()

        lr_curve: list[tuple[float, float]] = []
        if self.lr == "auto":
            optimizer = torch.optim.AdamW(_scaled(groups, 1.0), weight_decay=self.weight_decay)
            lr, lr_curve = find_lr(
                model,
                optimizer,
                images,
                labels,
                loss_fn=loss_fn,
                augment=augment,
                batch_size=context.batch_size,
                seed=context.seed,
                set_modes=set_modes,
            )
            log.info("LR finder suggests lr=%.2g", lr)
        else:
            lr = float(self.lr)
        params["lr"] = float(f"{lr:.3g}")
        optimizer = torch.optim.AdamW(_scaled(groups, lr), weight_decay=self.weight_decay)
        steps_per_epoch = max(1, len(images) // rank_and_world()[1] // context.batch_size)
        total = steps_per_epoch * self.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total, int(self.warmup_fraction * total))
        )
        history: list[dict[str, float]] = []
        start_epoch = 0
        checkpoint = context.checkpoint_dir
        if checkpoint is not None and context.resume:
            state = load_checkpoint(checkpoint, network, optimizer, scheduler)
            if state is not None:
                start_epoch, history = state
                params["resumed_from_epoch"] = start_epoch
        for epoch in range(start_epoch, self.epochs):
            stats = train_one_epoch(
                model,
                optimizer,
                scheduler,
                images,
                labels,
                loss_fn=loss_fn,
                augment=augment,
                batch_size=context.batch_size,
                seed=context.seed * 1000 + epoch,
                set_modes=set_modes,
                epoch_label=f"epoch {epoch + 1}/{self.epochs}",
            )
            row = {
                "epoch": float(epoch + 1),
                "train_loss": stats.loss,
                "train_accuracy": stats.accuracy,
                "lr": float(optimizer.param_groups[-1]["lr"]),
                "seconds": stats.seconds,
            }
            if len(val_images):
                logits = torch.from_numpy(evaluate_logits(network, val_images, 64))
                row["val_loss"] = float(
                    torch.nn.functional.cross_entropy(logits, torch.from_numpy(val_labels))
                )
                row["val_accuracy"] = float((logits.argmax(1).numpy() == val_labels).mean())
            history.append(row)
            log.info("epoch %d/%d: %s", epoch + 1, self.epochs, _format(row))
            if checkpoint is not None and rank_and_world()[0] == 0:
                save_checkpoint(checkpoint, network, optimizer, scheduler, epoch + 1, history)
        network.eval()
        extra: dict[str, Any] = {"lr_curve": lr_curve, "skipped": (*skipped, *val_skipped)}
        if carved and len(val_images):  # train() has no val/ to calibrate on: give ours
            extra["calibration"] = (evaluate_logits(network, val_images, 64), val_labels)
            extra["calibration_source"] = "validation images held out of train/"
            params["val_images"] = len(val_labels)
        return FittedHead(
            head=network.head,
            embedder=network.embedder,
            trained_backbone=True,
            params=params,
            history=history,
            extra=extra,
        )

    def _split(self, context: FitContext) -> tuple[list[Sample], list[Sample], bool]:
        """(train, val, carved): val/ if given, else a stratified slice of train."""
        train, val = list(context.splits["train"]), list(context.splits.get("val", []))
        if val or not 0.0 < self.val_fraction < 1.0:
            return train, val, False
        train, val = split_samples(train, self.val_fraction, seed=context.seed)
        log.info("validation: %d training images held out (no val/)", len(val))
        return train, val, bool(val)

    def _param_groups(self, network: _Network) -> tuple[list[dict[str, Any]], set[torch.nn.Module]]:
        """Head group + layer-decayed backbone groups; freezes what ``unfreeze`` leaves out."""
        backbone = network.embedder.backbone
        if hasattr(backbone, "group_matcher"):
            groups = param_groups_layer_decay(
                backbone, weight_decay=self.weight_decay, layer_decay=self.layer_decay
            )
        else:  # not a timm model (torchvision): one group, no layer-wise decay
            groups = [{"params": list(backbone.parameters()), "lr_scale": 1.0}]
        scales = sorted({float(g["lr_scale"]) for g in groups}, reverse=True)
        keep = scales if self.unfreeze == "all" else scales[: int(self.unfreeze)]
        trainable: list[dict[str, Any]] = []
        for group in groups:
            if float(group["lr_scale"]) in keep:
                group["lr_scale"] = float(group["lr_scale"]) * self.backbone_lr_mult
                trainable.append(group)
            else:
                for param in group["params"]:
                    param.requires_grad_(False)
        frozen = {
            sub
            for sub in backbone.modules()
            if any(True for _ in sub.parameters(recurse=False))
            and not any(p.requires_grad for p in sub.parameters(recurse=False))
        }
        head_group = {"params": list(network.head.parameters()), "lr_scale": 1.0}
        return [*trainable, head_group], frozen


@dataclass
class Scratch(FineTune):
    """Strategy ``scratch``: the whole network at one LR, BatchNorm training.

    From the pretrained weights by default (cs231n: "in practice initialise
    from pretrained"); ``pretrained=False`` starts from random weights.
    """

    name: ClassVar[str] = "scratch"
    epochs: int = 5
    lr: float | str = 1e-3
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    bn: str = "train"
    probe_head: bool = False


def _scaled(groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    return [{**g, "lr": lr * float(g["lr_scale"])} for g in groups]


def _reset_parameters(module: torch.nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _format(row: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
