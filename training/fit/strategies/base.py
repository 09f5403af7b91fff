"""What every training strategy gets and gives back.

A strategy is a small object with a ``name`` and a ``fit(context)`` method.
It receives a :class:`FitContext` (the classes, the train/val samples, the
backbone, and cached frozen-backbone features of any layer on demand) and
returns a :class:`FittedHead`: a head (a torch module from embeddings to
logits, or a :class:`~tlserve.training.fit.heads.TreeHead`) plus the embedder to
export (the context's, unless the strategy picked another layer or trained
the backbone), and typed fields for everything ``train()`` reads back
(held-out logits to calibrate on, skipped files, the candidates ``auto``
scored). Every strategy exports through the same
:func:`~tlserve.training.artifact.export.export_onnx` and is verified the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from tlserve.contract.card import Preprocessing
from tlserve.training.backbone.backbones import Backbone
from tlserve.training.backbone.layers import Layer, Layers, PooledFeatures, format_layer
from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.data.folders import Sample
from tlserve.training.features.cache import feature_key, load_features, save_features
from tlserve.training.features.extract import Features, SkippedFile, extract_features
from tlserve.training.fit.heads import Head
from tlserve.training.fit.selection import Score

__all__ = ["FitContext", "FittedHead", "HeldOutLogits", "Strategy", "class_weights"]


@dataclass
class FitContext:
    """Everything a strategy may use; ``features()`` embeds lazily and caches.

    ``probe_layers`` are embedded together in one forward pass whenever any of
    them is asked for (``auto`` compares the last layer with earlier ones).
    ``cache_dir`` (None: memory only) keeps embeddings across runs.
    ``deadline`` (a :func:`time.monotonic` instant, None: no limit) is when
    the time budget runs out; strategies that can stop early respect it.
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
    deadline: float | None = None
    _cache: dict[tuple[str, Layer], Features] = field(default_factory=dict, repr=False)
    _embedders: dict[Layers, ImageEmbedder] = field(default_factory=dict, repr=False)

    @property
    def embedder(self) -> ImageEmbedder:
        """The frozen backbone's own embedding (layer ``last``)."""
        return self.embedder_for(None)

    def seconds_left(self) -> float:
        """Seconds until ``deadline`` (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def with_preprocessing(self, spec: Preprocessing) -> FitContext:
        """This context embedding images prepared by ``spec`` (its own features and embedders)."""
        backbone = dataclasses.replace(self.backbone, preprocessing=spec)
        return dataclasses.replace(self, backbone=backbone, _cache={}, _embedders={})

    def adopt(self, other: FitContext) -> None:
        """Embed as ``other`` does from now on (``auto``'s measured geometry), with its features."""
        self.backbone, self._cache, self._embedders = other.backbone, other._cache, other._embedders

    def embedder_for(self, layer: Layers) -> ImageEmbedder:
        if layer not in self._embedders:
            module = self.backbone.module
            if layer is not None:
                module = PooledFeatures(module, layer if isinstance(layer, tuple) else (layer,))
            self._embedders[layer] = ImageEmbedder(module, self.backbone.preprocessing)
        return self._embedders[layer]

    def features(self, split: str, layer: Layers = None) -> Features:
        """Frozen-backbone features of ``split`` at ``layer`` (a tuple: concatenated), once."""
        if isinstance(layer, tuple):
            parts = [self.features(split, one) for one in layer]
            return Features(
                np.concatenate([p.embeddings for p in parts], axis=1),
                parts[0].labels,
                parts[0].paths,
                parts[0].skipped,
            )
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
                embedder,
                samples,
                batch_size=self.batch_size,
                workers=self.workers,
                export_dir=self.cache_dir,  # the exported embedder is cached beside its features
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
    """scikit-learn's "balanced" weights, ``n / (C * count)``; a class with no image gets 1."""
    present = np.unique(labels)
    weights = np.ones(n_classes, dtype=np.float64)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


@dataclass(frozen=True)
class HeldOutLogits:
    """Logits of images the model did not train on, to fit the temperature on."""

    logits: np.ndarray
    labels: np.ndarray
    source: str


@dataclass(frozen=True)
class FittedHead:
    """A strategy's result.

    ``head`` maps embeddings ``[N, D]`` to logits ``[N, C]``. ``embedder`` is
    the embedder to export; ``layer`` says which layer's features it gives (a
    frozen strategy's features are then reused from the context's cache).
    ``trained_backbone`` is true when the backbone's weights changed.
    ``params`` are the figures worth recording (e.g. chosen ``C``, CV accuracy);
    ``history`` one row per epoch for the training curves. ``strategy`` is
    the strategy that made the head (``auto``: the one it chose, ``reason``
    says why; ``candidates`` are everything it scored). ``val_images`` is
    how many training images were held out of training to validate on.
    """

    head: Head
    embedder: ImageEmbedder
    strategy: str
    layer: Layers = None
    trained_backbone: bool = False
    params: Mapping[str, float | int | str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    calibration: HeldOutLogits | None = None
    skipped: tuple[SkippedFile, ...] = ()
    lr_curve: list[tuple[float, float]] = field(default_factory=list)
    val_images: int = 0
    reason: str = ""
    candidates: tuple[Score, ...] = ()


class Strategy(Protocol):
    """A way to turn a pretrained backbone and labelled images into a classifier."""

    name: ClassVar[str]

    def fit(self, context: FitContext) -> FittedHead:
        """Fit on ``context``'s train (and, if the strategy wants, val) split."""
        ...
