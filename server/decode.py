"""Classify's image decoding: a fast path for large JPEGs, the exact path for the rest.

Training prepares images with :func:`tlserve.contract.images.prepare_image`
(full decode, then resize the shorter side with the model's interpolation,
then centre-crop). For a large JPEG most of that work is wasted: a 4000 px
photo is decoded in full only to be shrunk to 256 px. libjpeg-turbo (through
``simplejpeg``) can decode at 1/2, 1/4 or 1/8 scale in the DCT domain, which
is several times faster; the result is then resized and cropped by the same
:func:`~tlserve.contract.images.resize_and_crop` as training.

The fast path decodes at the smallest scale whose shorter side is still at
least ``oversample`` times the resize target, so the final resize always
shrinks by at least that factor and the DCT scaling's softer filter barely
shows. **Stated tolerance** (tests/server/test_preprocess_fast.py, real
photos encoded as 2000-4000 px JPEGs): mean absolute difference from
``prepare_image`` at most 2.0 grey levels (of 255) per image, and the same
top-1 ImageNet class with the real EfficientNet-Lite0.

Everything else takes the exact path, bit for bit what training does: PNG and
other formats, JPEGs with an EXIF rotation, CMYK JPEGs, JPEGs too small to
downscale, and anything ``simplejpeg`` refuses. Both paths check the image's
size from its header against ``max_pixels`` before decoding a single pixel.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from PIL import Image

from tlserve.contract.card import Preprocessing
from tlserve.contract.errors import InvalidInput
from tlserve.contract.images import prepare_image, resize_and_crop, short_side
from tlserve.contract.rules import MAX_IMAGE_PIXELS


def _load_simplejpeg() -> ModuleType | None:
    """simplejpeg is in the serve extras; without it every image takes the exact path."""
    try:
        return importlib.import_module("simplejpeg")
    except ImportError:  # pragma: no cover - depends on the install
        return None


simplejpeg = _load_simplejpeg()

__all__ = ["EXACT", "FAST_JPEG", "ImageDecoder"]

log = logging.getLogger(__name__)

FAST_JPEG = "jpeg_fast"
EXACT = "exact"

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
_HEADER_ERRORS = (OSError, ValueError, SyntaxError)


@dataclass(frozen=True)
class _Header:
    width: int
    height: int
    mode: str
    orientation: int


@dataclass(frozen=True)
class ImageDecoder:
    """Turns one encoded image into the model's uint8 ``[H, W, 3]`` row.

    ``max_pixels``: refuse images larger than this (width x height), read
    from the header. ``fast_jpeg``: allow the DCT-downscaling path.
    ``oversample``: the fast path's decoded shorter side is at least this
    many times the resize target.
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    fast_jpeg: bool = True
    oversample: float = 1.5

    def prepare(self, data: bytes, spec: Preprocessing) -> tuple[np.ndarray, str]:
        """The model input row for ``data`` and the path taken (``jpeg_fast`` or ``exact``)."""
        header = _read_header(data)
        if header is not None and header.width * header.height > self.max_pixels:
            raise InvalidInput(
                f"image is {header.width}x{header.height} pixels, more than the server's "
                f"limit of {self.max_pixels} (TLSERVE_MAX_IMAGE_PIXELS)"
            )
        if header is not None and self._fast_path_applies(data, header, spec):
            row = self._decode_fast(data, header, spec)
            if row is not None:
                return row, FAST_JPEG
        # Garbage also lands here, and prepare_image raises InvalidInput naming the problem.
        return prepare_image(data, spec), EXACT

    def _fast_path_applies(self, data: bytes, header: _Header, spec: Preprocessing) -> bool:
        return (
            self.fast_jpeg
            and simplejpeg is not None
            and data.startswith(_JPEG_MAGIC)
            and header.mode in ("RGB", "L")
            and header.orientation == 1
            and min(header.width, header.height) >= 2 * self._target(spec)
        )

    def _target(self, spec: Preprocessing) -> int:
        """Shorter side the fast path must keep: oversample x the resize size."""
        return math.ceil(self.oversample * short_side(spec))

    def _decode_fast(self, data: bytes, header: _Header, spec: Preprocessing) -> np.ndarray | None:
        target = self._target(spec)
        if simplejpeg is None:
            return None
        try:
            # simplejpeg picks the smallest DCT scale (1/8 .. 1) keeping both sides >= target.
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=target, min_width=target
            )
        except ValueError as exc:  # truncated or exotic: the exact path decides
            log.debug("fast JPEG decode refused (%s); using the exact path", exc)
            return None
        return _resize_and_crop_scaled(Image.fromarray(pixels), header, spec)


def _dct_scale(full: int, reduced: int) -> float:
    """The libjpeg scale M/8 that turned ``full`` pixels into ``reduced`` (ceil)."""
    for eighths in range(1, 9):
        if math.ceil(full * eighths / 8) == reduced:
            return eighths / 8
    return reduced / full


def _resize_and_crop_scaled(image: Image.Image, header: _Header, spec: Preprocessing) -> np.ndarray:
    """:func:`resize_and_crop`'s geometry computed on the full-size image.

    The DCT-scaled image has ``ceil(size * M / 8)`` pixels per side, so its
    aspect ratio drifts by up to a pixel; resizing from the exact source box
    that the full image maps to keeps the crop aligned with training's.
    """
    sx = _dct_scale(header.width, image.width)
    sy = _dct_scale(header.height, image.height)
    box = (0.0, 0.0, header.width * sx, header.height * sy)
    return resize_and_crop(image, spec, full_size=(header.width, header.height), box=box)


def _read_header(data: bytes) -> _Header | None:
    """Size, mode and EXIF orientation from the header alone; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = 1
            if image.format == "JPEG":
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
            return _Header(image.width, image.height, image.mode, orientation)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"image refused before decoding, far over the server's pixel limit "
            f"(TLSERVE_MAX_IMAGE_PIXELS): {exc}"
        ) from exc
    except _HEADER_ERRORS:
        return None
