"""The settings of a backbone-training run: what ``finetune`` and ``scratch`` are made of.

Apart from the strategies so that the run (:mod:`~tlserve.training.fit.strategies.run`)
and its parameter groups (:mod:`~tlserve.training.fit.strategies.network`) can take
them without importing the strategies that start runs. The module docstring
of :mod:`~tlserve.training.fit.strategies.finetune` says what each one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Recipe"]


@dataclass
class Recipe:
    """The settings, with ``finetune``'s defaults; ``name`` is the strategy's."""

    name: ClassVar[str]
    epochs: int = 10  # at most: early stopping picks the best epoch
    patience: int = 3
    lr: float | str = 1e-3
    backbone_lr_mult: float = 0.1
    layer_decay: float = 0.75
    unfreeze: int | str = "all"
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    augment: str = "auto"
    bn: str = "frozen"
    probe_head: bool = True
    pretrained: bool = True
    val_fraction: float = 0.15  # carved from train when there is no val/
    precision: str = "auto"  # float32, bf16 or auto (tlserve.training.fit.precision)
    weight_average: str = "ema"  # ema (scored beside the raw weights, kept if better) or none
