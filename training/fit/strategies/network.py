"""The trainable network of ``finetune``/``scratch``: its head, loss and parameter groups.

Groups come from timm's :func:`~timm.optim.param_groups_layer_decay` (the
learning rate decays by ``layer_decay`` per layer group towards the stem);
``unfreeze`` keeps only the last groups trainable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Public (timm.optim lists it), though its __init__ does not re-export it for mypy.
from timm.optim import param_groups_layer_decay  # type: ignore[attr-defined]

from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.fit.strategies.base import FitContext, class_weights
from tlserve.training.fit.strategies.linear import fit_logistic_regression
from tlserve.training.fit.strategies.recipe import Recipe
from tlserve.training.fit.strategies.validation import PreparedImages

__all__ = ["Network", "loss_function", "param_groups", "probe_head", "reset_parameters"]


class Network(torch.nn.Module):
    """Embedder then head: what a backbone-training run trains."""

    def __init__(self, embedder: ImageEmbedder, head: torch.nn.Module) -> None:
        super().__init__()
        self.embedder = embedder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.embedder(images))
        return logits


def param_groups(
    network: Network, recipe: Recipe
) -> tuple[list[dict[str, Any]], set[torch.nn.Module]]:
    """Head group + layer-decayed backbone groups; freezes what ``unfreeze`` leaves out."""
    backbone = network.embedder.backbone
    if hasattr(backbone, "group_matcher"):
        groups = param_groups_layer_decay(
            backbone, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay
        )
    else:  # not a timm model (torchvision): one group, no layer-wise decay
        groups = [{"params": list(backbone.parameters()), "lr_scale": 1.0}]
    scales = sorted({float(g["lr_scale"]) for g in groups}, reverse=True)
    keep = scales if recipe.unfreeze == "all" else scales[: int(recipe.unfreeze)]
    trainable: list[dict[str, Any]] = []
    for group in groups:
        if float(group["lr_scale"]) in keep:
            group["lr_scale"] = float(group["lr_scale"]) * recipe.backbone_lr_mult
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


def reset_parameters(module: torch.nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def probe_head(
    context: FitContext, data: PreparedImages, recipe: Recipe, probe_c: float | None
) -> tuple[torch.nn.Module, float | None]:
    """(head, its C): the linear probe on the frozen features of the run's training images.

    A new random head instead (C None) without ``probe_head`` or pretrained
    weights; ``probe_c`` skips the probe's CV when the strength is known.
    """
    if not (recipe.probe_head and recipe.pretrained):
        return torch.nn.Linear(context.backbone.feature_dim, len(context.classes)), None
    train = context.features("train")
    val = set(data.val_rows)
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
    return probe.linear.train(), probe.c if probe_c is None else probe_c


def loss_function(
    context: FitContext, labels: np.ndarray, recipe: Recipe, device: torch.device
) -> torch.nn.Module:
    """Cross-entropy with the recipe's label smoothing (class-weighted when ``balanced``)."""
    weight = None
    if context.balanced:
        weights = class_weights(labels, len(context.classes))
        weight = torch.tensor(weights, dtype=torch.float32).to(device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing)
