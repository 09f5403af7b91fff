"""Flat training loops for the strategies that train the backbone (torchvision-references style).

Images live in memory as uint8 ``[N, H, W, 3]`` (decoded once); each epoch
shuffles them with a generator seeded by ``seed + epoch`` so that every
DistributedDataParallel rank draws the same permutation and takes its own
slice. Augmentation runs on the batch, in the training process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torchvision.transforms import v2
from tqdm import tqdm

__all__ = [
    "Augment",
    "EpochStats",
    "evaluate_logits",
    "find_lr",
    "rank_and_world",
    "train_one_epoch",
    "warmup_cosine",
]

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Augment:
    """Light augmentation on uint8 NHWC batches: random resized crop (scale 0.7-1), flip if asked.

    Flips are off by default: they change the meaning of digits and text.
    """

    def __init__(self, size: tuple[int, int], *, kind: str = "light") -> None:
        if kind not in ("none", "light", "flip"):
            raise ValueError(f"augment must be none, light or flip, got {kind!r}")
        steps: list[v2.Transform] = []
        if kind != "none":
            steps.append(v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True))
        if kind == "flip":
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps) if steps else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return images
        chw = images.permute(0, 3, 1, 2)
        out = torch.stack([self.transform(image) for image in chw])
        return out.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    seconds: float


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine to 0 (per optimiser step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _shard(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """This rank's batches of one epoch: same permutation on every rank, equal counts."""
    rank, world = rank_and_world()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    per_rank = n // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [b for b in torch.split(mine, batch_size) if len(b) > 1]  # BN needs 2+


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    loss_fn: torch.nn.Module,
    augment: Augment,
    batch_size: int,
    seed: int,
    set_modes: Callable[[], None],
    epoch_label: str,
) -> EpochStats:
    """One pass over this rank's share of ``images``; returns mean loss and accuracy."""
    start = time.perf_counter()
    set_modes()
    batches = _shard(len(images), batch_size, seed)
    total_loss, correct, seen = 0.0, 0, 0
    rank, _ = rank_and_world()
    bar = tqdm(batches, desc=epoch_label, unit="batch", disable=None if rank == 0 else True)
    for index in bar:
        x = augment(torch.from_numpy(images[index.numpy()]))
        y = torch.from_numpy(labels[index.numpy()])
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    bar.close()
    return EpochStats(
        total_loss / max(seen, 1), correct / max(seen, 1), time.perf_counter() - start
    )


def evaluate_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits ``[N, C]`` (eval mode, no augmentation)."""
    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunks.append(model(torch.from_numpy(images[start : start + batch_size])).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


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
        loss = loss_fn(
            model(augment(torch.from_numpy(images[index]))), torch.from_numpy(labels[index])
        )
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
