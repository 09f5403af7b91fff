"""Training strategies, by name.

Each strategy is a small class implementing :class:`Strategy`: ``linear`` and
``trees`` (frozen backbone, last or earlier layer), ``finetune`` and
``scratch`` (train the backbone), and ``auto``, which scores the others on
one validation protocol within a time budget, keeps the measured best and
says why.
"""

from __future__ import annotations

from typing import Any

from tlserve.training.strategies.auto import AutoStrategy
from tlserve.training.strategies.base import FitContext, FittedHead, HeldOutLogits, Strategy
from tlserve.training.strategies.finetune import FineTune, Scratch
from tlserve.training.strategies.linear import LinearProbe
from tlserve.training.strategies.trees import TreeProbe

__all__ = [
    "STRATEGIES",
    "FitContext",
    "FittedHead",
    "HeldOutLogits",
    "Strategy",
    "create_strategy",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (LinearProbe, TreeProbe, FineTune, Scratch, AutoStrategy)
}


def create_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name``, built with ``options`` (its dataclass fields).

    Options the strategy does not have are ignored (the CLI passes one set of
    flags to whichever strategy is chosen); ``auto`` hands the fine-tuning ones on.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError as exc:
        raise ValueError(
            f"unknown strategy {name!r}: available are {', '.join(sorted(STRATEGIES))}"
        ) from exc
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    known = {k: v for k, v in options.items() if k in fields}
    if cls is AutoStrategy:
        tuning = set(FineTune.__dataclass_fields__)
        known["options"] = {k: v for k, v in options.items() if k in tuning}
    return cls(**known)
