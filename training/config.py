"""One frozen object with every setting of a training run.

The environment is read here, once: ``TLSERVE_CACHE_DIR`` (default
``~/.cache/tlserve``) holds the feature cache (``features/``) and resume
checkpoints (``checkpoints/``); nothing below this object reads it again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlserve.training.backbone.backbones import DEFAULT_BACKBONE
from tlserve.training.features.cache import default_cache_dir

__all__ = ["DEFAULT_STRATEGY", "DEFAULT_TIME_BUDGET_GPU", "TrainConfig", "cache_root"]

# What `tlserve train` does unless told: measure the candidates and keep the
# best (`auto`). On every `make bench-auto` set it scores within half a point
# of the last-layer probe or above it, and on the example data it takes about
# a minute on 2 cores (docs/training.md).
DEFAULT_STRATEGY = "auto"

# `auto`'s default budget with a GPU, in seconds: it fine-tunes in that. On a
# CPU the default is sized to the data by train()
# (tlserve.training.fit.strategies.budget: from the image count and the
# backbone's measured forward time).
DEFAULT_TIME_BUDGET_GPU = 900.0


def cache_root() -> Path:
    """``$TLSERVE_CACHE_DIR``, else ``~/.cache/tlserve``: the folder above the feature cache's."""
    return default_cache_dir(os.environ).parent


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`~tlserve.training.train` needs to know.

    ``strategy`` is ``linear``, ``trees``, ``finetune``, ``scratch`` or
    ``auto``; ``options`` are its settings (e.g. ``{"layer": -2}``,
    ``{"epochs": 3, "lr": "auto"}``). ``image_size`` overrides the backbone's
    input size (default: its native one). ``balanced`` (None: when the
    largest class is at least twice the smallest) weights classes inversely
    to their size. ``cache`` keeps embeddings across runs under
    ``cache_dir``; ``resume`` continues an interrupted ``finetune``/
    ``scratch``. ``time_budget`` (seconds, for the whole run) bounds what
    ``auto`` tries and stops training epochs that would pass it; None means
    :meth:`budget`'s default for ``auto`` (on a CPU: sized to the data) and no
    limit otherwise. ``workers``
    is the number of image decoding processes.
    """

    data_dir: Path
    model_repository: Path
    name: str
    strategy: str = DEFAULT_STRATEGY
    backbone: str = DEFAULT_BACKBONE
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    backbone_weights: Path | None = None
    test_fraction: float = 0.2
    image_size: int | None = None
    balanced: bool | None = None
    calibrate: bool = True
    cache: bool = True
    cache_dir: Path = field(default_factory=cache_root)
    resume: bool = False
    time_budget: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    drop_duplicates: bool = False
    # Faster variants published beside the float32 export when they pass the
    # accuracy check (tlserve.training.artifact.quantize): none, int8, fp16 or
    # auto. The command line defaults to auto; the API to none, so callers get
    # float32 unless they ask.
    quantize: str = "none"

    def __post_init__(self) -> None:
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {self.time_budget}")

    @property
    def features_dir(self) -> Path | None:
        """Where embeddings are cached (None: ``cache`` is off)."""
        return self.cache_dir / "features" if self.cache else None

    @property
    def checkpoints_dir(self) -> Path:
        return self.cache_dir / "checkpoints"

    def budget(self, *, gpu: bool) -> float | None:
        """Seconds this run may take: ``time_budget``, else ``auto``'s GPU default, else None.

        None for ``auto`` on a CPU: its default is sized to the data when the
        data is known (``train()``, :mod:`~tlserve.training.fit.strategies.budget`).
        """
        if self.time_budget is not None:
            return self.time_budget
        if self.strategy != "auto" or not gpu:
            return None
        return DEFAULT_TIME_BUDGET_GPU
