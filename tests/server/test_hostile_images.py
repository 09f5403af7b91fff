"""Hostile images, decoded without a server: formats, geometry, memory and budgets."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from tlserve.contract.card import Preprocessing
from tlserve.contract.errors import InvalidInput
from tlserve.contract.images import RESAMPLE, decode_image, prepare_image, resized_size
from tlserve.server.core.decode import IMAGE_FORMATS, ImageDecoder, image_format

SPEC = Preprocessing(
    height=224, width=224, crop_pct=0.875, interpolation="bicubic",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)  # fmt: skip


def _png(width: int, height: int, *, empty: bool = False) -> bytes:
    """A grey PNG of any size, a few bytes long (``empty``: a header with no pixels)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    rows = zlib.compress(b"" if empty else (b"\0" + b"\x80" * width) * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _saved(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _two_step(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """The textbook geometry: resize the shorter side, then centre-crop."""
    new_w, new_h = resized_size(image.width, image.height, spec)
    resized = image.resize((new_w, new_h), RESAMPLE[spec.interpolation])
    left, top = round((new_w - spec.width) / 2.0), round((new_h - spec.height) / 2.0)
    return np.asarray(resized.crop((left, top, left + spec.width, top + spec.height)))


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (1000, 200), (257, 256), (64, 600)])
def test_normal_images_are_prepared_bit_for_bit_as_before(size: tuple[int, int]) -> None:
    image = Image.open(io.BytesIO(_saved("PNG", size))).convert("RGB")
    np.testing.assert_array_equal(prepare_image(_saved("PNG", size), SPEC), _two_step(image, SPEC))


@pytest.mark.parametrize("size", [(4000, 1), (1, 4000), (2_100_000, 1), (5000, 3)])
def test_an_extreme_aspect_ratio_is_cropped_before_it_is_resized(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recorded(
        self: Image.Image, new_size: tuple[int, int], *args: object, **kw: object
    ) -> Image.Image:
        made.append(new_size)
        return resize(self, new_size, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", recorded)
    row = prepare_image(_png(*size), SPEC)
    # Resized first, a 4000x1 image became 1,024,000x256 pixels (768 MB, seconds).
    assert made == [(224, 224)]
    assert row.shape == (224, 224, 3)
    assert (row == 0x80).all()


def test_a_cropped_first_strip_is_within_two_grey_levels_of_the_two_step_result() -> None:
    gradient = np.linspace(0, 255, 451 * 3).reshape(1, 451, 3).repeat(12, axis=0)
    strip = Image.fromarray(gradient.astype(np.uint8))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    difference = np.abs(prepare_image(buffer.getvalue(), SPEC).astype(int) - _two_step(strip, SPEC))
    assert difference.max() <= 2


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF", "GIF", "PPM"])
def test_training_still_reads_every_format_pillow_reads(fmt: str) -> None:
    assert decode_image(_saved(fmt)).size == (40, 30)


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF", "GIF", "PPM", "EPS", "DDS", "ICO"])
def test_the_server_refuses_other_formats_before_pillow_opens_them(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow was asked to open a refused format")

    data = _saved(fmt) if fmt != "EPS" else b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"
    monkeypatch.setattr(Image, "open", never)
    with pytest.raises(InvalidInput, match="not JPEG or PNG"):
        ImageDecoder().prepare(data, SPEC)


def test_a_jpeg_magic_in_front_of_another_format_reaches_only_the_jpeg_decoder() -> None:
    eps = b"\xff\xd8\xff%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"
    assert image_format(eps) == "JPEG"
    with pytest.raises(InvalidInput, match="unreadable JPEG header"):
        ImageDecoder().prepare(eps, SPEC)


def test_allowed_formats_are_jpeg_and_png() -> None:
    assert set(IMAGE_FORMATS) == {"JPEG", "PNG"}
    assert image_format(_saved("JPEG")) == "JPEG"
    assert image_format(_saved("PNG")) == "PNG"


def test_decoder_failures_of_any_kind_are_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("a plugin that cannot")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with pytest.raises(InvalidInput, match="NotImplementedError: a plugin that cannot"):
        decode_image(_saved("PNG"))


def test_the_per_request_budget_counts_every_image_from_its_header() -> None:
    decoder = ImageDecoder(max_request_pixels=3 * 4000 * 2000 - 1)
    images = [_png(4000, 2000)] * 3
    with pytest.raises(InvalidInput, match=r"3 images have 24000000 pixels in all"):
        decoder.read_headers(images)
    assert len(ImageDecoder(max_request_pixels=3 * 4000 * 2000).read_headers(images)) == 3


def test_an_image_over_the_pixel_limit_is_refused_from_its_header() -> None:
    claims = _png(5000, 5000, empty=True)
    with pytest.raises(InvalidInput, match="5000x5000 pixels"):
        ImageDecoder(max_pixels=1_000_000).read_headers([_png(10, 10), claims])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_are_applied_as_before(orientation: int) -> None:
    image = Image.open(io.BytesIO(_saved("JPEG", (50, 30))))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    data = buffer.getvalue()
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decode_image(data)), np.asarray(expected))
