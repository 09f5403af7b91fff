"""Training strategies, by name.

Each strategy is a small class implementing :class:`Strategy`. Only
``linear`` exists so far; ``trees``, ``finetune``, ``scratch`` and ``auto``
(which measures data size and similarity to ImageNet and says why it chose)
register here as they arrive.
"""

from __future__ import annotations

from typing import Any

from tlserve.training.strategies.base import FitContext, FittedHead, Strategy
from tlserve.training.strategies.linear import LinearProbe

__all__ = ["STRATEGIES", "FitContext", "FittedHead", "Strategy", "create_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {
    LinearProbe.name: LinearProbe,
}


def create_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name``, built with ``options`` (its dataclass fields)."""
    try:
        cls = STRATEGIES[name]
    except KeyError as exc:
        raise ValueError(
            f"unknown strategy {name!r}: available are {', '.join(sorted(STRATEGIES))}"
        ) from exc
    return cls(**options)
