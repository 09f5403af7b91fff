"""finetune under torchrun: 2 CPU processes (gloo) train as well as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.ddp_train import main as train_once


@pytest.mark.slow
def test_two_processes_match_one(shapes_folder: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.json"
    train_once(str(shapes_folder), str(tmp_path / "repo1"), str(single))
    ddp = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.training.ddp_train", str(shapes_folder), str(tmp_path / "repo2"), str(ddp)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert (one["world"], two["world"]) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "repo2" / "ddp").iterdir()) == ["1"]  # rank 0 only
    # Same data, same epochs, half the batches per process: quality must match.
    assert two["accuracy"] >= 0.6 and abs(two["accuracy"] - one["accuracy"]) <= 0.15
