"""Training strategies, by name.

Each strategy is a small class implementing :class:`Strategy`: ``linear`` and
``trees`` (frozen backbone, last or earlier layer), ``finetune`` and
``scratch`` (train the backbone), and ``auto``, which scores the others on
one validation protocol within a time budget, keeps the measured best and
says why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tlserve.contract.errors import ConfigError
from tlserve.training.fit.strategies.auto import AutoStrategy
from tlserve.training.fit.strategies.base import FitContext, FittedHead, HeldOutLogits, Strategy
from tlserve.training.fit.strategies.finetune import FineTune, Scratch
from tlserve.training.fit.strategies.linear import LinearProbe
from tlserve.training.fit.strategies.trees import TreeProbe

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

    ``auto`` also takes fine-tuning's options and hands them on to the
    candidates it trains. An option the strategy does not have is a
    :class:`ConfigError` naming it and those it takes: a typo (``epoch=3``)
    must not train with the default unnoticed.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError as exc:
        raise ValueError(
            f"unknown strategy {name!r}: available are {', '.join(sorted(STRATEGIES))}"
        ) from exc
    own = _settings(cls) - {"options"}
    handed_on = _settings(FineTune) if cls is AutoStrategy else set()
    unknown = sorted(set(options) - own - handed_on)
    if unknown:
        raise ConfigError(
            f"strategy {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(sorted(own | handed_on))}"
        )
    if cls is AutoStrategy:
        mine = {k: v for k, v in options.items() if k in own}
        return AutoStrategy(**mine, options={k: v for k, v in options.items() if k not in own})
    return cls(**options)


def _settings(cls: type) -> set[str]:
    """A strategy's dataclass fields (its ClassVar ``name`` is not one)."""
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
