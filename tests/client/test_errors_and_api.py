"""The client's public surface, its errors, the model card and image preprocessing."""

from __future__ import annotations

import io
import math
import struct
import types
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

import tlserve.client
from tlserve.client import (
    DeadlineExceeded,
    InvalidInput,
    ModelCard,
    ModelNotFound,
    NotAllowed,
    Overloaded,
    Preprocessing,
    ServerError,
    TlserveError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from tlserve.contract.card import SCHEMA_VERSION
from tlserve.contract.errors import from_rpc_error, from_status_message
from tlserve.contract.images import MAX_IMAGE_PIXELS, decode_image, prepare_image

# --- the public surface (httpx's test_exported_members, adapted)


def test_all_is_exactly_the_public_surface() -> None:
    public = {
        name
        for name, value in vars(tlserve.client).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        # `from __future__ import annotations` leaves a feature flag behind.
        and type(value).__module__ != "__future__"
    }
    assert set(tlserve.client.__all__) == public
    assert tlserve.client.__all__ == sorted(tlserve.client.__all__)
    assert len(set(tlserve.client.__all__)) == len(tlserve.client.__all__)


def test_every_exported_name_imports() -> None:
    namespace: dict[str, Any] = {}
    exec("from tlserve.client import *", namespace)
    assert set(tlserve.client.__all__) <= set(namespace)
    modules = [f"client.{m}" for m in ("aio", "client", "results", "transport")]
    modules += [f"contract.{m}" for m in ("card", "codec", "errors", "images", "predictions")]
    for module in [*modules, "contract.rules"]:
        submodule = __import__(f"tlserve.{module}", fromlist=["__all__"])
        for name in submodule.__all__:
            assert hasattr(submodule, name), f"tlserve.{module}.{name}"


def test_image_input_alias_is_a_real_type_at_runtime() -> None:
    assert isinstance(b"...", tlserve.client.ImageInput)  # type: ignore[arg-type]


def test_every_error_is_a_tlserve_error_with_its_status_code() -> None:
    expected = {
        ModelNotFound: grpc.StatusCode.NOT_FOUND,
        InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
        Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
        DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
        Unavailable: grpc.StatusCode.UNAVAILABLE,
        Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        ServerError: grpc.StatusCode.INTERNAL,
    }
    for cls, code in expected.items():
        assert issubclass(cls, TlserveError)
        assert cls.code == code


# --- from_rpc_error, with a minimal grpc.Call (real calls: test_client_calls.py)


class FakeCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed unary call raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


MAPPED: dict[grpc.StatusCode, type[TlserveError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: NotAllowed,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_from_rpc_error_maps_each_status_code(code: grpc.StatusCode) -> None:
    error = from_rpc_error(FakeCall(code, "what the server said"))
    assert type(error) is MAPPED.get(code, ServerError)
    assert str(error) == f"{code.name}: what the server said"


def test_from_rpc_error_without_a_call_is_a_server_error() -> None:
    error = from_rpc_error(grpc.RpcError("transport broke"))
    assert type(error) is ServerError
    assert str(error) == "UNKNOWN: transport broke"


class HintedCall(FakeCall):
    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...],
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        super().__init__(code, "queue full")
        self._metadata = metadata

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:  # type: ignore[override]
        return self._metadata


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ((("retry-after-ms", "250"),), 0.25),
        ((("other", "1"), ("retry-after-ms", "0")), 0.0),
        ((("retry-after-ms", "soon"),), None),
        ((), None),
    ],
)
def test_overloaded_carries_the_retry_hint_in_seconds(
    metadata: tuple[tuple[str, str], ...], seconds: float | None
) -> None:
    error = from_rpc_error(HintedCall(metadata))
    assert isinstance(error, Overloaded) and error.retry_after == seconds


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [((("deadline-left-ms", "40"),), 0.04), ((("retry-after-ms", "40"),), None), ((), None)],
)
def test_a_deadline_refusal_carries_the_time_the_call_still_had(
    metadata: tuple[tuple[str, str], ...], seconds: float | None
) -> None:
    error = from_rpc_error(HintedCall(metadata, grpc.StatusCode.DEADLINE_EXCEEDED))
    assert isinstance(error, DeadlineExceeded) and error.seconds_left == seconds


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("INVALID_ARGUMENT: image 0: cannot decode image", InvalidInput),
        ("NOT_FOUND: no model ghost", ModelNotFound),
        ("RESOURCE_EXHAUSTED: queue full", Overloaded),
        ("INTERNAL: boom", ServerError),
        ("garbled", ServerError),
    ],
)
def test_a_stream_error_message_becomes_its_typed_error(text: str, cls: type) -> None:
    error = from_status_message(text)
    assert type(error) is cls and str(error) == text


# --- the model card


def _card() -> ModelCard:
    return ModelCard(
        labels=("cat", "dog", "ünïcode label"),
        preprocessing=Preprocessing(
            height=240, width=240, crop_pct=0.9, interpolation="bilinear",
            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        ),
        backbone="efficientnet_lite0",
        strategy="fine-tune",
        metrics={"val_accuracy": 0.93, "val_loss": 0.21},
        created="2024-05-01T12:00:00Z",
        data_fingerprint="sha256:abc",
        tlserve_version="0.1.0",
        notes={"author": "me"},
    )  # fmt: skip


def test_model_card_round_trips_through_props() -> None:
    card = _card()
    props = card.to_props()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in props.items())
    assert all(k.startswith("tlserve.") for k in props)
    assert props["tlserve.schema"] == str(SCHEMA_VERSION)
    assert ModelCard.from_props(props) == card
    # Other metadata in the same ONNX model is ignored.
    assert ModelCard.from_props({**props, "producer": "pytorch"}) == card


def test_a_minimal_card_round_trips_with_defaults() -> None:
    card = ModelCard(labels=("a",), preprocessing=Preprocessing())
    assert ModelCard.from_props(card.to_props()) == card


@pytest.mark.parametrize("props", [{}, {"producer": "pytorch", "tlserve.labels": '["a"]'}])
def test_from_props_without_a_card_is_none(props: dict[str, str]) -> None:
    assert ModelCard.from_props(props) is None


def test_a_newer_schema_asks_to_upgrade() -> None:
    props = {**_card().to_props(), "tlserve.schema": str(SCHEMA_VERSION + 1)}
    with pytest.raises(
        ValueError, match=f"schema {SCHEMA_VERSION + 1} is newer .* upgrade tlserve"
    ):
        ModelCard.from_props(props)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tlserve.schema", "not json"),
        ("tlserve.schema", "null"),
        ("tlserve.labels", None),  # removed
        ("tlserve.labels", "not json"),
        ("tlserve.labels", "3"),
        ("tlserve.preprocessing", None),
        ("tlserve.preprocessing", '{"height": 224}'),
        ("tlserve.preprocessing", '"bicubic"'),
        ("tlserve.preprocessing", '{"height": 224, "width": 224, "crop_pct": 2.0, '
         '"interpolation": "bicubic", "mean": [0, 0, 0], "std": [1, 1, 1]}'),
    ],
)  # fmt: skip
def test_a_malformed_card_is_a_value_error(key: str, value: str | None) -> None:
    props = _card().to_props()
    if value is None:
        del props[key]
    else:
        props[key] = value
    with pytest.raises(ValueError):
        ModelCard.from_props(props)


@pytest.mark.parametrize(("key", "value"), [("tlserve.metrics", "[1, 2]"), ("tlserve.notes", "5")])
def test_a_card_whose_mappings_are_not_objects_is_a_value_error(key: str, value: str) -> None:
    props = {**_card().to_props(), key: value}
    with pytest.raises(ValueError):
        ModelCard.from_props(props)


def test_a_malformed_card_names_the_key() -> None:
    props = {**_card().to_props(), "tlserve.labels": "cat,dog"}
    with pytest.raises(ValueError, match=r"tlserve\.labels"):
        ModelCard.from_props(props)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 0}, "input size must be positive, got 0x224"),
        ({"width": -3}, "input size must be positive, got 224x-3"),
        ({"crop_pct": 0.0}, r"crop_pct must be in \(0, 1\], got 0.0"),
        ({"crop_pct": 1.01}, r"crop_pct must be in \(0, 1\], got 1.01"),
        ({"crop_pct": math.nan}, r"crop_pct must be in \(0, 1\], got nan"),
        ({"interpolation": "lanczos"}, "interpolation must be one of .*got 'lanczos'"),
    ],
)
def test_preprocessing_refuses_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessing(**kwargs)


# --- preprocessing: decode, resize, crop


def _encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _palette_image(size: tuple[int, int]) -> Image.Image:
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, 9, 99, 199] + [0] * (256 * 3 - 6))
    return image


SPEC = Preprocessing(height=32, width=32, crop_pct=0.875, interpolation="bicubic")


@pytest.mark.parametrize(
    ("data", "rgb"),
    [
        (_encode(Image.new("RGB", (90, 40), (200, 100, 50))), (200, 100, 50)),  # landscape
        (_encode(Image.new("RGB", (40, 90), (200, 100, 50))), (200, 100, 50)),  # portrait
        (_encode(Image.new("L", (50, 60), 77)), (77, 77, 77)),  # grayscale
        (_encode(Image.new("RGBA", (60, 50), (10, 20, 30, 40))), (10, 20, 30)),  # alpha dropped
        (_encode(_palette_image((45, 70))), (9, 99, 199)),
        (_encode(Image.new("RGB", (64, 48), (200, 100, 50)), "JPEG", quality=100), None),
        (_encode(Image.new("CMYK", (64, 48), (0, 0, 0, 0)), "JPEG"), None),
        (_encode(Image.new("RGB", (20, 20), (1, 2, 3))), (1, 2, 3)),  # upscaled
    ],
    ids=["landscape", "portrait", "gray", "rgba", "palette", "jpeg", "cmyk-jpeg", "small"],
)
def test_prepare_image_gives_the_model_input_row(
    data: bytes, rgb: tuple[int, int, int] | None
) -> None:
    row = prepare_image(data, SPEC)
    assert row.shape == (32, 32, 3)
    assert row.dtype == np.uint8
    if rgb is not None:
        assert (row == np.array(rgb, np.uint8)).all()


def test_non_square_input_size() -> None:
    spec = Preprocessing(height=24, width=40, crop_pct=1.0)
    for size in [(100, 30), (30, 100), (40, 24)]:
        assert prepare_image(_encode(Image.new("RGB", size)), spec).shape == (24, 40, 3)


def test_exif_orientation_is_applied() -> None:
    landscape = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    assert decode_image(_encode(landscape, "JPEG", exif=exif)).size == (20, 40)
    assert decode_image(_encode(landscape, "JPEG")).size == (40, 20)


@pytest.fixture(scope="module")
def astronaut_png() -> bytes:
    skimage_data = pytest.importorskip("skimage.data")
    return _encode(Image.fromarray(skimage_data.astronaut()))


@pytest.mark.parametrize(
    ("interpolation", "crop_pct"), [("bicubic", 0.875), ("bilinear", 0.95), ("nearest", 1.0)]
)
@pytest.mark.parametrize(
    "box", [(0, 0, 512, 512), (60, 0, 380, 512), (0, 90, 512, 400)],
    ids=["square", "portrait", "landscape"],
)  # fmt: skip
def test_matches_torchvision_resize_and_center_crop_exactly(
    astronaut_png: bytes, interpolation: str, crop_pct: float, box: tuple[int, int, int, int]
) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    photo = _encode(Image.open(io.BytesIO(astronaut_png)).crop(box))
    size = 224
    reference = transforms.Compose(
        [
            transforms.Resize(
                math.floor(size / crop_pct),
                interpolation=getattr(transforms.InterpolationMode, interpolation.upper()),
            ),
            transforms.CenterCrop(size),
        ]
    )
    expected = np.asarray(reference(Image.open(io.BytesIO(photo)).convert("RGB")))
    spec = Preprocessing(height=size, width=size, crop_pct=crop_pct, interpolation=interpolation)
    np.testing.assert_array_equal(prepare_image(photo, spec), expected)


def _png_header_only() -> bytes:
    return _encode(Image.new("RGB", (50, 40), (1, 2, 3)))[:40]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        _encode(Image.new("RGB", (50, 40), (1, 2, 3)))[:60],  # truncated in the pixels
        _png_header_only(),
        b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
    ],
    ids=["empty", "garbage", "truncated", "header-only", "bad-chunks"],
)
def test_undecodable_bytes_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="cannot decode image") as caught:
        prepare_image(data, SPEC)
    assert caught.value.__cause__ is not None


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side pixels, tens of kB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits, all black
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "side",
    [
        9_000,  # over tlserve's 64 Mpx limit
        12_000,  # over Pillow's own warning threshold too
        20_000,  # past 2x Pillow's limit: Image.open itself refuses
    ],
)
def test_decompression_bomb_is_refused_from_its_header(side: int) -> None:
    data = _bomb_png(side)
    assert len(data) < 100_000
    assert side * side > MAX_IMAGE_PIXELS
    # The PNG is valid: had it been decoded, no error would be raised at all.
    with pytest.raises(InvalidInput, match="limit"):
        prepare_image(data, SPEC)


def test_a_large_image_under_the_limit_is_accepted() -> None:
    row = prepare_image(_bomb_png(2_000), SPEC)
    assert row.shape == (32, 32, 3)
    assert (row == 0).all()


def test_a_16_bit_greyscale_png_keeps_its_contrast() -> None:
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    row = prepare_image(buffer.getvalue(), SPEC)
    assert row.min() < 30 and row.max() > 220  # not clipped to white
    assert (row[..., 0] == row[..., 1]).all()
