"""Helpers for the training tests: a tiny real dataset drawn with PIL.

Three classes of distinct coloured shapes on noisy backgrounds, at random
sizes and positions, so that a classifier on even a randomly initialised
CNN's features separates them well above chance.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tlserve.training.backbone.backbones import Backbone
from tlserve.training.data.folders import load_dataset
from tlserve.training.fit.strategies import FitContext

# A 0.2M-parameter timm ConvNeXt at 64x64: random init, O(1) embeddings,
# created in milliseconds.
TINY_BACKBONE = "timm:test_convnext@64"

SHAPES = {
    "circle": (220, 40, 40),
    "square": (40, 180, 60),
    "triangle": (50, 80, 230),
}


def draw_shape(kind: str, rng: np.random.Generator, size: int = 72) -> Image.Image:
    """One image of ``kind`` (a key of SHAPES) on a noisy grey background."""
    background = rng.integers(90, 170, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 3, size * 2 // 3))
    x0, y0 = (int(v) for v in rng.integers(0, size - extent, size=2))
    box = (x0, y0, x0 + extent, y0 + extent)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in SHAPES[kind])
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        corners = [(x0, y0 + extent), (x0 + extent, y0 + extent), (x0 + extent // 2, y0)]
        draw.polygon(corners, fill=colour)
    return image


def write_shapes(root: Path, per_class: int, *, seed: int = 0, suffix: str = ".png") -> None:
    """``root/<shape>/<i><suffix>`` for each shape class."""
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, rng).save(root / kind / f"{i:03d}{suffix}")


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fit_context(root: Path, backbone: Backbone, **settings: Any) -> FitContext:
    """A strategy's context on the dataset at ``root`` (batches of 8, no workers)."""
    dataset = load_dataset(root)
    return FitContext(
        classes=dataset.classes,
        backbone=backbone,
        splits=dataset.splits(),
        batch_size=8,
        workers=0,
        **settings,
    )
