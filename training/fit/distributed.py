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

__all__ = ["broadcast_path", "init_distributed", "leave_distributed"]

log = logging.getLogger(__name__)


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        log.info("distributed: rank %d of %d", dist.get_rank(), dist.get_world_size())


def leave_distributed() -> None:
    """Leave the process group, if joined: at the end of a process that trained.

    Left to interpreter exit, gloo's threads are torn down mid-flight; one
    rank of a finished 2-process run aborted that way ("terminate called
    without an active exception", exit -6).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_path(path: Path) -> Path:
    if not (dist.is_available() and dist.is_initialized()):
        return path
    holder: list[Any] = [str(path)]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])
