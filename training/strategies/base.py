"""What every training strategy gets and gives back.

A strategy is a small object with a ``name`` and a ``fit(context)`` method.
It receives a :class:`FitContext` (the classes, the train/val samples, the
embedder, and cached frozen-backbone features on demand) and returns a
:class:`FittedHead`: a torch module from embeddings to logits, plus the
embedder to export (the same one, unless the strategy trained the backbone).
Keeping the result pure torch means every strategy exports through the same
:func:`~tlserve.training.export.export_onnx` and is verified the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from tlserve.training.data import Sample
from tlserve.training.features import Features, extract_features
from tlserve.training.modules import ImageEmbedder

__all__ = ["FitContext", "FittedHead", "Strategy"]


@dataclass
class FitContext:
    """Everything a strategy may use; ``features()`` embeds lazily and caches."""

    classes: tuple[str, ...]
    embedder: ImageEmbedder
    splits: Mapping[str, list[Sample]]
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    _cache: dict[str, Features] = field(default_factory=dict, repr=False)

    def features(self, split: str) -> Features:
        """Frozen-backbone features of ``split`` ("train", "val", "test"), computed once."""
        if split not in self._cache:
            self._cache[split] = extract_features(
                self.embedder,
                self.splits.get(split, []),
                batch_size=self.batch_size,
                workers=self.workers,
            )
        return self._cache[split]

    def cached(self) -> Mapping[str, Features]:
        """The splits embedded so far."""
        return dict(self._cache)


@dataclass(frozen=True)
class FittedHead:
    """A strategy's result.

    ``head`` maps embeddings ``[N, D]`` to logits ``[N, C]``. ``embedder`` is
    the embedder to export; a strategy that keeps the backbone frozen returns
    ``context.embedder`` itself (then cached features stay valid).
    ``params`` are the figures worth recording (e.g. chosen ``C``, CV accuracy).
    """

    head: torch.nn.Module
    embedder: ImageEmbedder
    params: Mapping[str, float | int | str] = field(default_factory=dict)


class Strategy(Protocol):
    """A way to turn a pretrained backbone and labelled images into a classifier."""

    name: ClassVar[str]

    def fit(self, context: FitContext) -> FittedHead:
        """Fit on ``context``'s train (and, if the strategy wants, val) split."""
        ...
