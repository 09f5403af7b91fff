"""What the client sends and gets back: image inputs and typed results."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

from tlserve.contract.card import ModelCard
from tlserve.contract.errors import InvalidInput, TlserveError
from tlserve.contract.predictions import Classification, Prediction

__all__ = [
    "Classification",
    "ImageInput",
    "ModelMetadata",
    "ModelStatus",
    "Prediction",
    "StreamResult",
    "TensorMetadata",
    "encode_image",
    "image_batch",
    "to_pil",
]

#: An image to classify: a file path, encoded bytes, a PIL image or an
#: ``[H, W, 3]`` (or ``[H, W]``, ``[H, W, 4]``) uint8 array.
ImageInput: TypeAlias = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output tensor of a model (``-1``: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A served model: its tensors, provider and (if it has one) model card."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    execution_provider: str
    card: ModelCard | None


@dataclass(frozen=True)
class ModelStatus:
    """One model version in the server's repository (``state``: READY, UNAVAILABLE, ...)."""

    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class StreamResult:
    """The answer to the ``index``-th image of a stream.

    A failed image does not end the stream: ``error`` holds its typed error
    and ``predictions`` is empty. ``predictions.ood_score`` and
    ``predictions.out_of_distribution`` say how unlike the training data it is.
    """

    index: int
    predictions: Classification
    error: TlserveError | None = None


def _checked_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim < 2 or image.shape[2:] not in ((), (3,), (4,)):
        raise InvalidInput(
            "an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
            f"got {image.dtype} {image.shape}"
        )
    return image


def to_pil(image: ImageInput) -> Image.Image:
    """A PIL image for any accepted form that is already decoded (PIL or array)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(_checked_array(image))
    raise InvalidInput(f"cannot use {type(image).__name__} as a decoded image")


def encode_image(image: ImageInput) -> bytes:
    """Encoded bytes for any accepted image form (arrays and PIL as PNG)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image | np.ndarray):
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidInput(f"cannot send {type(image).__name__} as an image")


def image_batch(images: ImageInput | object) -> list[ImageInput]:
    """One image or an iterable of them, as a list (a lone image is a batch of one)."""
    if isinstance(images, str | Path | bytes | Image.Image | np.ndarray):
        return [images]
    if not isinstance(images, Iterable):
        raise InvalidInput(f"cannot send {type(images).__name__} as images")
    try:
        return list(images)
    except TypeError as exc:
        raise InvalidInput(f"cannot send {type(images).__name__} as images") from exc
