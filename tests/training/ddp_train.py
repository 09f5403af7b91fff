"""Run by test_distributed under ``torchrun``: one finetune, result as JSON (rank 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.training.shapes import TINY_BACKBONE
from tlserve.training import train
from tlserve.training.fit.distributed import leave_distributed
from tlserve.training.fit.loops import rank_and_world


def main(data: str, repo: str, out: str) -> None:
    result = train(
        Path(data),
        model_repository=Path(repo),
        name="ddp",
        strategy="finetune",
        backbone=TINY_BACKBONE,
        workers=0,
        batch_size=8,
        cache=False,
        options={"epochs": 3, "lr": 3e-3, "augment": "none"},
    )
    rank, world = rank_and_world()
    if rank == 0:
        row = {"accuracy": result.test_accuracy, "world": world, "version": result.version}
        Path(out).write_text(json.dumps(row))
    leave_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
