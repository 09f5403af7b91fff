"""Where backbone training runs, and in which precision.

``finetune`` and ``scratch`` train on the GPU when torch sees one (the
``LOCAL_RANK``-th under ``torchrun``), else on the CPU; the trained network
goes back to the CPU for export. ``precision``:

- ``float32``: everything in float32;
- ``bf16``: forward and loss under ``torch.autocast`` in bfloat16 (weights,
  gradients and optimiser state stay float32, so no loss scaling is needed);
- ``auto`` (default): ``bf16`` on a GPU that supports it (every one since
  Ampere). On a CPU it is decided where the run runs, by measurement: a CPU
  without bfloat16 instructions (``avx512_bf16`` or ``amx_bf16`` in
  ``/proc/cpuinfo``; an AVX2-only host) emulates bf16 and is never faster,
  so it trains in ``float32`` without trying; on one with them, a few
  forward-and-backward steps of the run's own network on its own images are
  timed in each precision, alternating, and ``bf16`` is kept only when it
  is at least :data:`BF16_MARGIN` faster. It has gone both ways on the same
  2-core AVX-512 BF16/AMX host: with an older torch, bf16 doubled the
  forward alone but made whole steps slower (29.1 against 46.2 images/s,
  lite0 at 128 px); with torch 2.14 whole steps were about 10 % faster
  (51 against 46 images/s). Hence a measurement, not a rule.

The exported model is float32 whatever the training precision: autocast
changes how the forward runs, not the weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = [
    "BF16_MARGIN",
    "PRECISIONS",
    "autocast",
    "choose_precision",
    "cpu_has_bf16",
    "resolve_precision",
    "training_device",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bf16")

#: How much faster (images/s ratio) bf16 steps must measure on a CPU to be kept:
#: the two are timed alternately on a shared host, where a few percent is noise.
BF16_MARGIN = 1.1

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def training_device() -> torch.device:
    """The GPU this process should train on, or the CPU without one."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX); False if unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in _BF16_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device, cpuinfo: Path = CPUINFO) -> str:
    """``float32``, ``bf16``, or ``measure`` (a CPU with bf16 instructions: time both)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "float32"
    return "measure" if cpu_has_bf16(cpuinfo) else "float32"


def choose_precision(
    precision: str,
    device: torch.device,
    speed: Callable[[str], float],
    cpuinfo: Path = CPUINFO,
) -> tuple[str, str]:
    """(``float32`` or ``bf16``, why) for ``precision`` on ``device``.

    ``speed(p)`` measures images/s of a training step in ``p``; it is called
    only when :func:`resolve_precision` says ``measure``: twice per precision,
    alternating, best of each.
    """
    resolved = resolve_precision(precision, device, cpuinfo)
    if resolved != "measure":
        why = "asked" if precision != "auto" else f"on {device.type}"
        if precision == "auto" and device.type == "cpu":
            why = "CPU without bf16 instructions"
        return resolved, why
    measured: dict[str, float] = {"float32": 0.0, "bf16": 0.0}
    for _ in range(2):
        for name in measured:
            measured[name] = max(measured[name], speed(name))
    faster = measured["bf16"] >= BF16_MARGIN * measured["float32"]
    why = (
        f"measured {measured['bf16']:.1f} (bf16) against {measured['float32']:.1f} "
        f"(float32) images/s"
    )
    log.info("training precision: %s, %s", "bf16" if faster else "float32", why)
    return ("bf16" if faster else "float32"), why


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward and loss of one training step in ``precision`` (resolved)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
