"""Decode and resize images exactly as training did.

One function, :func:`prepare_image`, is used by training (to compute
features), by the server (for ``Classify``) and by the client (for
client-side preprocessing), so all three agree bit for bit; the server's
fast JPEG path calls the same :func:`resize_and_crop` geometry.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tlserve.contract.card import Preprocessing
from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import MAX_IMAGE_PIXELS

__all__ = [
    "RESAMPLE",
    "decode_image",
    "prepare_decoded",
    "prepare_image",
    "resize_and_crop",
    "resized_size",
    "short_side",
]

#: The model card's interpolation names as Pillow filters.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def decode_image(data: bytes | Path | str) -> Image.Image:
    """Decode JPEG/PNG/... bytes or a file into an RGB image.

    Raises :class:`InvalidInput` for anything that is not a readable image
    (or is larger than :data:`MAX_IMAGE_PIXELS`), naming what went wrong.
    """
    source: io.BytesIO | Path = (
        io.BytesIO(data) if isinstance(data, bytes | bytearray) else Path(data)
    )
    try:
        # The size check reads only the header: nothing is decoded before it.
        with Image.open(source) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInput(
                    f"image is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS}"
                )
            return _to_rgb(ImageOps.exif_transpose(opened))
    except InvalidInput:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise InvalidInput(f"cannot decode image: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, scaling 16/32-bit greyscale down rather than clipping it to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def short_side(spec: Preprocessing) -> int:
    """The shorter side every image is resized to before the crop: ``floor(size / crop_pct)``."""
    return math.floor(max(spec.height, spec.width) / spec.crop_pct)


def resized_size(width: int, height: int, spec: Preprocessing) -> tuple[int, int]:
    """The size an image of ``width`` x ``height`` is resized to before the centre crop.

    The shorter side becomes :func:`short_side`; the other keeps the aspect ratio.
    """
    scale_size = short_side(spec)
    if width <= height:
        return scale_size, int(scale_size * height / width)
    return int(scale_size * width / height), scale_size


def resize_and_crop(
    image: Image.Image,
    spec: Preprocessing,
    *,
    full_size: tuple[int, int] | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resize the shorter side to ``floor(size / crop_pct)``, centre-crop to size.

    Returns uint8 ``[height, width, 3]``, the model's ``images`` input row.
    ``full_size`` and ``box``: the geometry is that of an image of
    ``full_size``, of which ``image`` is a scaled copy whose region ``box``
    maps onto it (the server's DCT-scaled JPEG path).
    """
    width, height = full_size or image.size
    new_w, new_h = resized_size(width, height, spec)
    if box is not None or (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), RESAMPLE[spec.interpolation], box=box)
    left = round((new_w - spec.width) / 2.0)
    top = round((new_h - spec.height) / 2.0)
    image = image.crop((left, top, left + spec.width, top + spec.height))
    return np.asarray(image, dtype=np.uint8)


def prepare_image(data: bytes | Path | str, spec: Preprocessing) -> np.ndarray:
    """Decode, resize and crop one encoded image into the model's input row."""
    return resize_and_crop(decode_image(data), spec)


def prepare_decoded(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Resize and crop an already-decoded image (any mode) into the model's input row.

    The same pixels the server gets from :func:`prepare_image` after an
    image is sent to it as PNG: RGB conversion, then :func:`resize_and_crop`.
    """
    return resize_and_crop(_to_rgb(image), spec)
