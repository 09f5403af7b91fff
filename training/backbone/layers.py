"""Which layer's features a head is fitted on: the last (the embedding) or an earlier stage.

For data unlike ImageNet (digits, X-rays, spectrograms), features from an
earlier stage are often more useful than the last ones, which are tuned to
ImageNet's classes (cs231n's "small data, different domain" case).
:class:`PooledFeatures` wraps a timm model so that its output is the global
average of one or more stages' feature maps, concatenated; that module is the
exported embedder, so the served graph computes exactly what the head saw.

A layer is ``None`` (the model's own pooled embedding) or a negative index
into the model's ``feature_info`` (``-1`` the last stage, ``-2`` the one
before, ...), written ``last`` and ``-2`` on the command line. Several layers
(a tuple, written ``last,-1,-2``; ``multi`` is :data:`MULTI`) are pooled and
concatenated: multi-layer features, fine and coarse at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tlserve.training.backbone.backbones import embedding_width

__all__ = [
    "MULTI",
    "Layer",
    "Layers",
    "PooledFeatures",
    "format_layer",
    "layer_channels",
    "parse_layer",
]

Layer = int | None
Layers = Layer | tuple[Layer, ...]

# The embedding and the last three stages' pooled maps.
MULTI: tuple[Layer, ...] = (None, -1, -2, -3)


def parse_layer(text: str | int | tuple[Layer, ...] | None) -> Layers:
    """``"last"``/None → None; ``"-2"``/-2 → -2; ``"last,-2"`` → (None, -2); ``"multi"`` → MULTI.

    Raises ValueError otherwise.
    """
    if isinstance(text, tuple):
        return text
    if text is None or text == "last":
        return None
    if text == "multi":
        return MULTI
    if isinstance(text, str) and "," in text:
        parts = [parse_layer(part.strip()) for part in text.split(",")]
        return tuple(part for part in parts if not isinstance(part, tuple))
    try:
        index = int(text)
    except ValueError as exc:
        raise ValueError(f"layer must be 'last' or a negative stage index, got {text!r}") from exc
    if index >= 0:
        raise ValueError(f"layer index must be negative (-1 = last stage), got {index}")
    return index


def format_layer(layer: Layers) -> str:
    if isinstance(layer, tuple):
        return "multi" if layer == MULTI else ",".join(format_layer(one) for one in layer)
    return "last" if layer is None else str(layer)


def _stages(model: torch.nn.Module) -> list[dict[str, object]]:
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} does not expose its stages (timm feature_info + "
            "forward_intermediates): only layer='last' is available"
        )
    return list(info)


def layer_channels(model: torch.nn.Module, layer: Layer) -> int:
    """Width of the pooled features of ``layer``."""
    if layer is None:
        return embedding_width(model)
    stages = _stages(model)
    if -layer > len(stages):
        raise ValueError(f"layer {layer} does not exist: the model has {len(stages)} stages")
    channels: int = stages[layer]["num_chs"]  # type: ignore[assignment]
    return int(channels)


class PooledFeatures(torch.nn.Module):
    """Normalised NCHW images → concatenated pooled features of ``layers``."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[Layer]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("at least one layer is needed")
        self.model = model
        self.layers = tuple(layers)
        n = len(_stages(model)) if any(layer is not None for layer in layers) else 0
        self.indices = sorted({n + layer for layer in layers if layer is not None})
        self.widths = [layer_channels(model, layer) for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers == (None,):
            only: torch.Tensor = self.model(x)
            return only
        last_needed = None in self.layers
        out = self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=self.indices, intermediates_only=not last_needed
        )
        final, maps = out if last_needed else (None, out)
        by_index = dict(zip(self.indices, maps, strict=True))
        pooled: list[torch.Tensor] = []
        n = len(_stages(self.model)) if self.indices else 0
        for layer in self.layers:
            if layer is None:
                pooled.append(self.model.forward_head(final, pre_logits=True))  # type: ignore[operator]
            else:
                pooled.append(by_index[n + layer].mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)
