"""Decode and resize images exactly as training did.

One function, :func:`prepare_image`, is used by training (to compute
features), by the server (for ``Classify``) and by the client (for
client-side preprocessing), so all three agree bit for bit; the server's
fast JPEG path calls the same :func:`resize_and_crop` geometry.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def decode_image(data: bytes | Path | str, *, formats: Sequence[str] | None = None) -> Image.Image:
    """Decode JPEG/PNG/... bytes or a file into an RGB image.

    ``formats``: the Pillow format names (``"JPEG"``, ``"PNG"``) whose
    decoders may see the bytes; no other plugin is even asked whether it
    recognises them. ``None``: every format Pillow reads (training's own
    files). Raises :class:`InvalidInput` for anything that is not a readable
    image of those formats (or is larger than :data:`MAX_IMAGE_PIXELS`),
    naming what went wrong.
    """
    source: io.BytesIO | Path = (
        io.BytesIO(data) if isinstance(data, bytes | bytearray) else Path(data)
    )
    try:
        # The size check reads only the header: nothing is decoded before it.
        with Image.open(source, formats=None if formats is None else list(formats)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInput(
                    f"image is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS}"
                )
            # In place: a copy of a 64-megapixel image is 64-192 MB more at the peak.
            ImageOps.exif_transpose(opened, in_place=True)
            return _to_rgb(opened)
    except InvalidInput:
        raise
    except UnidentifiedImageError as exc:
        wanted = "an image" if formats is None else " or ".join(formats)
        raise InvalidInput(f"cannot decode image: not {wanted}") from exc
    except Exception as exc:
        # Decoder plugins fail on hostile bytes in every way (OSError,
        # SyntaxError, NotImplementedError, AttributeError, struct.error,
        # MemoryError, ...): each is the image's fault, not the caller's bug.
        raise InvalidInput(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, scaling 16/32-bit greyscale down rather than clipping it to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "RGB":
        # convert() would copy it: 192 MB more at the peak for 64 megapixels.
        # load() now, before the file it was opened from is closed.
        image.load()
        return image
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


# Beyond this many times the crop's pixels, the image is cropped before it
# is resized: a 4000x1 image would otherwise be resized to ~1,000,000x256
# (768 MB) to keep a 224x224 crop of it.
_CROP_FIRST_ABOVE = 16


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

    An image of extreme aspect ratio (its resized copy over
    ``_CROP_FIRST_ABOVE`` times the crop) is resized straight from the
    source region that the crop covers: the same geometry, and memory
    bounded by the crop (measured on photo strips: identical to the two-step
    result, or within 2 grey levels, mean 0.15).
    """
    width, height = full_size or image.size
    new_w, new_h = resized_size(width, height, spec)
    left = round((new_w - spec.width) / 2.0)
    top = round((new_h - spec.height) / 2.0)
    resample = RESAMPLE[spec.interpolation]
    if new_w * new_h > _CROP_FIRST_ABOVE * spec.width * spec.height:
        x0, y0, x1, y1 = box or (0.0, 0.0, float(image.width), float(image.height))
        sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h
        region = (
            x0 + left * sx,
            y0 + top * sy,
            x0 + (left + spec.width) * sx,
            y0 + (top + spec.height) * sy,
        )
        image = image.resize((spec.width, spec.height), resample, box=region)
        return np.asarray(image, dtype=np.uint8)
    if box is not None or (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample, box=box)
    image = image.crop((left, top, left + spec.width, top + spec.height))
    return np.asarray(image, dtype=np.uint8)


def prepare_image(
    data: bytes | Path | str, spec: Preprocessing, *, formats: Sequence[str] | None = None
) -> np.ndarray:
    """Decode, resize and crop one encoded image into the model's input row.

    ``formats``: as :func:`decode_image`'s (the server passes its allow-list).
    """
    return resize_and_crop(decode_image(data, formats=formats), spec)


def prepare_decoded(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Resize and crop an already-decoded image (any mode) into the model's input row.

    The same pixels the server gets from :func:`prepare_image` after an
    image is sent to it as PNG: RGB conversion, then :func:`resize_and_crop`.
    """
    return resize_and_crop(_to_rgb(image), spec)
