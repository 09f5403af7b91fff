"""Flat training loops for the strategies that train the backbone (torchvision-references style).

Images live in memory as uint8 ``[N, H, W, 3]`` (decoded once); each epoch
shuffles them with a generator seeded by ``seed + epoch`` so that every
DistributedDataParallel rank draws the same permutation and takes its own
slice. Augmentation runs on the batch, in the training process. The learning
rate follows timm's :class:`~timm.scheduler.CosineLRScheduler` (linear
warmup, then cosine), stepped per optimiser update.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torchvision.transforms import v2
from tqdm import tqdm

from tlserve.training.fit.precision import autocast, choose_precision

__all__ = [
    "AUGMENT_PRESETS",
    "Augment",
    "EpochStats",
    "OutOfTime",
    "augment_for",
    "cosine_schedule",
    "evaluate_logits",
    "is_grayscale",
    "measured_precision",
    "rank_and_world",
    "step_speed",
    "train_one_epoch",
]

AUGMENT_PRESETS = ("auto", "none", "light", "colour", "flip")

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Augment:
    """Augmentation on uint8 NHWC batches.

    ``light``: random resized crop (scale 0.7-1); ``colour`` adds colour
    jitter (brightness, contrast, saturation 0.2); ``flip`` adds horizontal
    flips to ``colour``. Flips are never on unless asked: they change the
    meaning of digits, text and left/right parts, and pixels cannot tell.
    """

    def __init__(self, size: tuple[int, int], *, kind: str = "light") -> None:
        if kind not in AUGMENT_PRESETS or kind == "auto":
            raise ValueError(f"augment must be none, light, colour or flip, got {kind!r}")
        steps: list[v2.Transform] = []
        if kind != "none":
            steps.append(v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True))
        if kind in ("colour", "flip"):
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
        if kind == "flip":
            steps.append(v2.RandomHorizontalFlip())
        self.kind = kind
        self.transform = v2.Compose(steps) if steps else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return images
        chw = images.permute(0, 3, 1, 2)
        out = torch.stack([self.transform(image) for image in chw])
        return out.permute(0, 2, 3, 1).contiguous()


def is_grayscale(images: np.ndarray) -> bool:
    """True when every pixel of uint8 ``[N, H, W, 3]`` images has R = G = B."""
    if images.size == 0:
        return False
    return bool(
        (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    )


def augment_for(kind: str, images: np.ndarray) -> str:
    """The preset ``auto`` stands for on these images: ``light`` on grayscale, else ``colour``.

    Colour jitter on grayscale images would only invent colours the model
    never sees when served; flips stay off (see :class:`Augment`).
    """
    if kind != "auto":
        return kind
    return "light" if is_grayscale(images) else "colour"


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    images_per_second: float


class OutOfTime(Exception):
    """An epoch was stopped because it would end after the deadline."""

    def __init__(self, projected_seconds: float, images_per_second: float) -> None:
        super().__init__(f"the epoch would take {projected_seconds:.0f} s more")
        self.projected_seconds = projected_seconds
        self.images_per_second = images_per_second


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
    """timm's warmup + cosine to 0 over ``total_steps`` optimiser updates.

    Each param group's ``lr`` is its base rate; timm multiplies a group's
    ``lr_scale`` in (the layer-wise decay).
    """
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps),
        lr_min=0.0,
        warmup_t=warmup_steps,
        warmup_lr_init=1e-7 if warmup_steps else 0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


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
    scheduler: Scheduler,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    loss_fn: torch.nn.Module,
    augment: Augment,
    batch_size: int,
    seed: int,
    set_modes: Callable[[], None],
    epoch_label: str,
    steps_done: int = 0,
    deadline: float | None = None,
    precision: str = "float32",
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over this rank's share of ``images``; returns mean loss and accuracy.

    ``steps_done`` counts the optimiser updates before this epoch (the
    schedule's position). With a ``deadline`` (:func:`time.monotonic`), the
    epoch stops with :class:`OutOfTime` as soon as its measured pace says it
    would end after it. Batches go to the model's device; ``precision``
    (``float32`` or ``bf16``, :mod:`~tlserve.training.fit.precision`) is how
    the forward and loss run. ``after_step`` runs after every optimiser
    update (the run's weight average).
    """
    device = _device_of(model)
    start = time.perf_counter()
    began = time.monotonic()
    set_modes()
    batches = _shard(len(images), batch_size, seed)
    total_loss, correct, seen = 0.0, 0, 0
    rank, _ = rank_and_world()
    bar = tqdm(batches, desc=epoch_label, unit="batch", disable=None if rank == 0 else True)
    for step, index in enumerate(bar):
        if deadline is not None and step >= 2:  # two batches: a pace to project from
            pace = (time.monotonic() - began) / step
            if time.monotonic() + pace * (len(batches) - step) > deadline:
                bar.close()
                raise OutOfTime(pace * (len(batches) - step), seen / max(1e-9, pace * step))
        x = augment(torch.from_numpy(images[index.numpy()])).to(device, non_blocking=True)
        y = torch.from_numpy(labels[index.numpy()]).to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(steps_done + step + 1)
        if after_step is not None:
            after_step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    return EpochStats(
        total_loss / max(seen, 1), correct / max(seen, 1), seconds, seen / max(seconds, 1e-9)
    )


def step_speed(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    loss_fn: torch.nn.Module,
    precision: str,
    steps: int = 2,
) -> float:
    """Images/s of forward, loss and backward on ``images`` in ``precision`` (one warm-up step).

    Measures a copy of ``model``: the caller's weights, gradients and
    BatchNorm statistics are untouched.
    """
    probe = copy.deepcopy(model)
    device = _device_of(probe)
    x = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).to(device)
    seconds = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        with autocast(device, precision):
            loss = loss_fn(probe(x), y)
        loss.backward()
        probe.zero_grad(set_to_none=True)
        if step:  # the first builds the kernels (oneDNN's bf16 ones on a CPU)
            seconds += time.perf_counter() - start
    return steps * len(images) / max(seconds, 1e-9)


def measured_precision(
    network: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    precision: str,
    *,
    loss_fn: torch.nn.Module,
    set_modes: Callable[[], None],
) -> tuple[str, str]:
    """(float32 or bf16, why) for training ``network``: timed on ``images`` where it is
    worth timing (:func:`~tlserve.training.fit.precision.choose_precision`)."""

    def speed(name: str) -> float:
        set_modes()
        return step_speed(network, images, labels, loss_fn=loss_fn, precision=name)

    return choose_precision(precision, _device_of(network), speed)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits ``[N, C]`` (eval mode, no augmentation)."""
    model.eval()
    device = _device_of(model)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            chunks.append(model(batch).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
