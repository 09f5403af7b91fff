"""Per-epoch checkpoints of a training run, for ``--resume``.

``last.pt`` holds the network, optimiser and scheduler state, the finished
epoch count, the history so far and the run's own ``extra`` state (its best
epoch). It is written to a temp file and renamed,
so an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler

__all__ = ["CHECKPOINT_FILENAME", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "last.pt"


def save_checkpoint(
    directory: Path,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    epoch: int,
    history: list[dict[str, float]],
    extra: dict[str, Any] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "history": history,
        "extra": extra or {},
    }
    tmp = directory / (CHECKPOINT_FILENAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILENAME)
    log.info("checkpoint after epoch %d: %s", epoch, directory / CHECKPOINT_FILENAME)


def load_checkpoint(
    directory: Path,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
) -> tuple[int, list[dict[str, float]], dict[str, Any]] | None:
    """Restore the states in place; return (epochs done, history, extra), or None if none."""
    path = directory / CHECKPOINT_FILENAME
    if not path.is_file():
        log.info("no checkpoint at %s: starting from the beginning", path)
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming after epoch %d from %s", state["epoch"], path)
    return int(state["epoch"]), list(state["history"]), dict(state.get("extra", {}))
