"""fastai's learning-rate range test, for ``lr="auto"`` in the backbone-training runs."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tlserve.training.fit.loops import Augment

__all__ = ["find_lr", "suggest_lr"]

log = logging.getLogger(__name__)


def find_lr(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    loss_fn: torch.nn.Module,
    augment: Augment,
    batch_size: int,
    seed: int,
    set_modes: Callable[[], None],
    steps: int = 40,
    low: float = 1e-6,
    high: float = 1.0,
) -> tuple[float, list[tuple[float, float]]]:
    """fastai-style LR range test; the model and optimiser are restored afterwards.

    The multiplier grows exponentially from ``low`` to ``high`` over ``steps``
    batches, scaling every group's LR (so discriminative ratios are kept);
    stops once the smoothed loss exceeds 4x its minimum. Returns the
    suggestion (the multiplier at the minimum smoothed loss / 10) and the curve.
    """
    device = next(model.parameters()).device
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    base = [group["lr"] for group in optimizer.param_groups]
    set_modes()
    curve: list[tuple[float, float]] = []
    smoothed, best, best_lr = 0.0, math.inf, low
    rng = torch.Generator().manual_seed(seed)
    for step in range(steps):
        mult = low * (high / low) ** (step / max(1, steps - 1))
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * mult
        index = torch.randint(len(images), (batch_size,), generator=rng).numpy()
        x = augment(torch.from_numpy(images[index])).to(device)
        loss = loss_fn(model(x), torch.from_numpy(labels[index]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smoothed = 0.9 * smoothed + 0.1 * float(loss.detach())
        value = smoothed / (1 - 0.9 ** (step + 1))
        curve.append((mult, value))
        if value < best:
            best, best_lr = value, mult
        if not math.isfinite(value) or value > 4 * best:
            break
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr
    return best_lr / 10.0, curve


def suggest_lr(
    model: torch.nn.Module,
    groups: list[dict[str, Any]],
    images: np.ndarray,
    labels: np.ndarray,
    weight_decay: float,
    **settings: Any,
) -> tuple[float, list[tuple[float, float]]]:
    """:func:`find_lr` over param ``groups`` (each at its ``lr_scale``) with a throwaway AdamW."""
    scaled = [{**g, "lr": float(g["lr_scale"])} for g in groups]
    finder = torch.optim.AdamW(scaled, weight_decay=weight_decay)
    lr, curve = find_lr(model, finder, images, labels, **settings)
    log.info("LR finder suggests lr=%.2g", lr)
    return lr, curve
