"""What every training strategy gets and gives back.

A strategy is a small object with a ``name`` and a ``fit(context)`` method.
It receives a :class:`FitContext` (the classes, the train/val samples, the
backbone, and cached frozen-backbone features of any layer on demand) and
returns a :class:`FittedHead`: a head (a torch module from embeddings to
logits, or a :class:`~tlserve.training.heads.TreeHead`) plus the embedder to
export (the context's, unless the strategy picked another layer or trained
the backbone). Every strategy exports through the same
:func:`~tlserve.training.export.export_onnx` and is verified the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from tlserve.training.backbones import Backbone
from tlserve.training.cache import feature_key, load_features, save_features
from tlserve.training.data import Sample
from tlserve.training.features import Features, extract_features
from tlserve.training.heads import Head
from tlserve.training.layers import Layer, PooledFeatures, format_layer
from tlserve.training.modules import ImageEmbedder

__all__ = ["FitContext", "FittedHead", "Strategy", "class_weights"]


@dataclass
class FitContext:
    """Everything a strategy may use; ``features()`` embeds lazily and caches.

    ``probe_layers`` are embedded together in one forward pass whenever any of
    them is asked for (``auto`` compares the last layer with an earlier one).
    ``cache_dir`` (None: memory only) keeps embeddings across runs.
    """

    classes: tuple[str, ...]
    backbone: Backbone
    splits: Mapping[str, list[Sample]]
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    balanced: bool = False
    probe_layers: tuple[Layer, ...] = (None,)
    cache_dir: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    _cache: dict[tuple[str, Layer], Features] = field(default_factory=dict, repr=False)
    _embedders: dict[Layer, ImageEmbedder] = field(default_factory=dict, repr=False)

    @property
    def embedder(self) -> ImageEmbedder:
        """The frozen backbone's own embedding (layer ``last``)."""
        return self.embedder_for(None)

    def embedder_for(self, layer: Layer) -> ImageEmbedder:
        if layer not in self._embedders:
            module = self.backbone.module
            if layer is not None:
                module = PooledFeatures(module, (layer,))
            self._embedders[layer] = ImageEmbedder(module, self.backbone.preprocessing)
        return self._embedders[layer]

    def features(self, split: str, layer: Layer = None) -> Features:
        """Frozen-backbone features of ``split`` at ``layer``, computed once."""
        if (split, layer) not in self._cache:
            layers = self.probe_layers if layer in self.probe_layers else (layer,)
            for key, features in self._extract(split, layers).items():
                self._cache[(split, key)] = features
        return self._cache[(split, layer)]

    def _extract(self, split: str, layers: Sequence[Layer]) -> dict[Layer, Features]:
        samples = self.splits.get(split, [])
        pooled = PooledFeatures(self.backbone.module, layers)
        what = f"{[format_layer(x) for x in layers]} {self.backbone.preprocessing}"
        key = feature_key(samples, self.backbone.module, what)
        found = load_features(self.cache_dir, key) if self.cache_dir else None
        if found is None:
            embedder = ImageEmbedder(pooled, self.backbone.preprocessing)
            found = extract_features(
                embedder, samples, batch_size=self.batch_size, workers=self.workers
            )
            if self.cache_dir:
                save_features(self.cache_dir, key, found)
        result: dict[Layer, Features] = {}
        start = 0
        for layer, width in zip(layers, pooled.widths, strict=True):
            columns = found.embeddings[:, start : start + width]
            result[layer] = Features(
                np.ascontiguousarray(columns), found.labels, found.paths, found.skipped
            )
            start += width
        return result

    def cached(self) -> Mapping[str, Features]:
        """The splits embedded so far (any layer)."""
        return {split: features for (split, _), features in self._cache.items()}


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (C * count)`` per class, scikit-learn's "balanced"."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return len(labels) / (n_classes * np.maximum(counts, 1.0))


@dataclass(frozen=True)
class FittedHead:
    """A strategy's result.

    ``head`` maps embeddings ``[N, D]`` to logits ``[N, C]``. ``embedder`` is
    the embedder to export; ``layer`` says which layer's features it gives (a
    frozen strategy's features are then reused from the context's cache).
    ``trained_backbone`` is true when the backbone's weights changed.
    ``params`` are the figures worth recording (e.g. chosen ``C``, CV accuracy);
    ``history`` one row per epoch for the training curves.
    """

    head: Head
    embedder: ImageEmbedder
    layer: Layer = None
    trained_backbone: bool = False
    params: Mapping[str, float | int | str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    """A way to turn a pretrained backbone and labelled images into a classifier."""

    name: ClassVar[str]

    def fit(self, context: FitContext) -> FittedHead:
        """Fit on ``context``'s train (and, if the strategy wants, val) split."""
        ...
