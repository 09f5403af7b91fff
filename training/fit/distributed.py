"""Join the process group ``torchrun`` describes; share rank 0's results.

With ``WORLD_SIZE`` > 1 in the environment (``torchrun`` sets it), training
joins the group (gloo on CPU, nccl on GPU) with no code change by the user.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["broadcast_path", "init_distributed"]

log = logging.getLogger(__name__)


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        log.info("distributed: rank %d of %d", dist.get_rank(), dist.get_world_size())


def broadcast_path(path: Path) -> Path:
    if not (dist.is_available() and dist.is_initialized()):
        return path
    holder: list[Any] = [str(path)]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])
