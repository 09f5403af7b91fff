"""Where backbone training runs, and in which precision.

``finetune`` and ``scratch`` train on the GPU when torch sees one (the
``LOCAL_RANK``-th under ``torchrun``), else on the CPU; the trained network
goes back to the CPU for export. ``precision``:

- ``float32``: everything in float32;
- ``bf16``: forward and loss under ``torch.autocast`` in bfloat16 (weights,
  gradients and optimiser state stay float32, so no loss scaling is needed);
- ``auto`` (default): ``bf16`` on a GPU that supports it (every one since
  Ampere), ``float32`` on a CPU. Measured on a 2-core CPU *with* AVX-512
  BF16 and AMX (``make bench-train``, lite0 at 128 px, the same 30 steps of
  32 images, interleaved): bf16 autocast doubled the forward alone (79 vs
  38 images/s) but made whole training steps slower, 29.1 against 46.2
  images/s (test accuracy 74.7% vs 74.0%, within noise): the backward pass
  in bf16 gains nothing on the CPU. ``bf16`` is there to ask for.

The exported model is float32 whatever the training precision: autocast
changes how the forward runs, not the weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "autocast", "resolve_precision", "training_device"]

PRECISIONS = ("auto", "float32", "bf16")


def training_device() -> torch.device:
    """The GPU this process should train on, or the CPU without one."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``float32`` or ``bf16``: what ``precision`` means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "float32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward and loss of one training step in ``precision`` (resolved)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
