"""A hostile caller, from outside: every malformed request gets a clear code.

One ``tlserve serve`` process (a 224 px model, so images cost what real ones
do) is sent hundreds of malformed requests as raw bytes through a generic
gRPC channel, as a client that is not tlserve's own would send them: by hand
(formats, geometry, tensors, protobuf wire errors, unknown methods, streams)
and with hypothesis (random bytes to every method, mutated valid messages).
None may get INTERNAL or UNKNOWN or hang; afterwards the server still answers
correctly, its metrics counted every refusal with its code, its log has no
traceback and few lines, and its RSS is within 1.5x of what it was before.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.support import build_tiny_classifier, png_bytes
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import tlserve_v1_pb2 as v1

SIZE = 224
MAX_IMAGE_PIXELS = 16_000_000
MAX_REQUEST_PIXELS = 20_000_000
MAX_IMAGES = 16

INV = "/inference.GRPCInferenceService/"
INFER = INV + "ModelInfer"
CLASSIFY = "/tlserve.v1.ImageService/Classify"
EMBED = "/tlserve.v1.ImageService/Embed"
HEALTH = "/grpc.health.v1.Health/Check"
UNARY_METHODS = [
    INFER, CLASSIFY, EMBED, HEALTH, INV + "ServerLive", INV + "ServerReady", INV + "ModelReady",
    INV + "ServerMetadata", INV + "ModelMetadata", INV + "ModelConfig", INV + "ModelStatistics",
    INV + "RepositoryIndex", INV + "RepositoryModelLoad", INV + "RepositoryModelUnload",
]  # fmt: skip

C = grpc.StatusCode
BAD = {C.INTERNAL, C.UNKNOWN, C.DEADLINE_EXCEEDED, C.UNAVAILABLE}
CLEAR = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.UNIMPLEMENTED}
FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    target: str
    metrics_url: str
    log: Path
    channel: grpc.Channel
    rss_before_mb: float = 0.0

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory now (``VmHWM``: its peak so far), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(field + r":\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1)) / 1024

    def call(self, method: str, payload: bytes, timeout: float = 10) -> tuple[C, str, bytes]:
        unary = self.channel.unary_unary(method)
        try:
            return C.OK, "", unary(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""  # type: ignore[attr-defined]

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as page:
            return page.read().decode()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hostile")
    build_tiny_classifier(root / "models" / "tiny" / "1" / "model.onnx", size=SIZE)
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLSERVE_")}
    env.update(
        TLSERVE_MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS),
        TLSERVE_MAX_REQUEST_PIXELS=str(MAX_REQUEST_PIXELS),
        TLSERVE_MAX_IMAGES_PER_REQUEST=str(MAX_IMAGES),
    )
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tlserve.cli.main", "serve", "--model-repository",
             str(root / "models"), "--grpc-port", "0", "--metrics-port", "0",
             "--drain-delay", "0", "--grace", "1"],
            stderr=sink, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (
            found := re.search(r"gRPC on (\S+:\d+).*?(http://\S+/metrics)", log.read_text())
        ):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with grpc.insecure_channel(found.group(1)) as channel:
            running = Served(process, found.group(1), found.group(2), log, channel)
            while "ready: serving" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            _warm_up(running)
            running.rss_before_mb = running.rss_mb()
            yield running
    finally:
        process.terminate()
        process.wait(timeout=20)


def _warm_up(served: Served) -> None:
    """Every path once, every preprocess thread started: the "before" of the RSS check."""
    for _ in range(3):
        _check_answers_correctly(served)
        images = [JPEG, png_bytes((1, 2, 3)), _png(4000, 1), _saved("JPEG", size=(900, 700))] * 2
        assert served.call(CLASSIFY, _images(CLASSIFY, *images))[0] == C.OK
        assert served.call(EMBED, _images(EMBED, *images))[0] == C.OK
        good = _images(CLASSIFY, JPEG)
        _stream(served, CLASSIFY + "Stream", v1.ClassifyStreamResponse.FromString, [good] * 4)


def _check_answers_correctly(served: Served) -> None:
    code, _, answer = served.call(
        CLASSIFY, v1.ClassifyRequest(model_name="tiny", images=[png_bytes((10, 10, 240))])
        .SerializeToString(),
    )  # fmt: skip
    assert code == C.OK
    assert v1.ClassifyResponse.FromString(answer).results[0].labels[0].label == "blue"
    code, _, answer = served.call(INFER, _infer(np.full((2, SIZE, SIZE, 3), 7, np.uint8)))
    assert code == C.OK
    assert pb.ModelInferResponse.FromString(answer).outputs[0].shape == [2, 3]
    code, _, answer = served.call(HEALTH, health_pb2.HealthCheckRequest().SerializeToString())
    assert health_pb2.HealthCheckResponse.FromString(answer).status == 1  # SERVING


# --- requests, built by hand -------------------------------------------------------------


def _infer(array: np.ndarray | None = None, **fields: object) -> bytes:
    request = pb.ModelInferRequest(model_name="tiny")
    if array is not None:
        request.inputs.add(name="images", datatype="UINT8", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    for key, value in fields.items():
        setattr(request, key, value)
    return request.SerializeToString()


def _tensor(
    shape: list[int], datatype: str = "UINT8", raw: bytes | None = b"", **kw: object
) -> bytes:
    request = pb.ModelInferRequest(model_name=str(kw.pop("model", "tiny")))
    tensor = request.inputs.add(name=str(kw.pop("name", "images")), datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    for field, values in kw.items():
        getattr(tensor.contents, field).extend(values)
    return request.SerializeToString()


def _images(method: str, *images: bytes, **fields: object) -> bytes:
    cls = v1.EmbedRequest if method == EMBED else v1.ClassifyRequest
    return cls(
        model_name=str(fields.pop("model", "tiny")), images=images, **fields
    ).SerializeToString()  # type: ignore[arg-type]


def _png(
    width: int, height: int, depth: int = 8, colour: int = 0, data: bytes | None = None
) -> bytes:
    """A PNG written by hand, so its header can claim anything."""
    if data is None:
        row = b"\0" + b"\x80" * (width * depth // 8)
        data = zlib.compress(row * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def _saved(
    fmt: str, mode: str = "RGB", size: tuple[int, int] = (32, 24), **options: object
) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_saved("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _dds_without_pixel_format() -> bytes:
    header = struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + b"\0" * 44
    return b"DDS " + header + struct.pack("<8I", 32, 0, 0, 0, 0, 0, 0, 0) + b"\0" * 1044


JPEG = _saved("JPEG")
OTHER_FORMATS = {
    fmt: _saved(fmt, mode)
    for fmt, mode in [
        ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"), ("GIF", "P"), ("PPM", "RGB"),
        ("ICO", "RGB"), ("TGA", "RGB"), ("PCX", "RGB"), ("SGI", "RGB"), ("QOI", "RGB"),
        ("SPIDER", "F"), ("EPS", "RGB"), ("PDF", "RGB"), ("XBM", "1"),
        ("MSP", "1"), ("DDS", "RGB"),
    ]
}  # fmt: skip
OTHER_FORMATS["DDS flags 0"] = _dds_without_pixel_format()
OTHER_FORMATS["EPS by hand"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
OTHER_FORMATS["SVG"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'

IMAGES_OK = {
    "png 1x1": _png(1, 1),
    "png 4000x1": _png(4000, 1),
    "png 1x4000": _png(1, 4000),
    "png 2100000x1": _png(2_100_000, 1),
    "png 16-bit grey": _png(40, 30, depth=16),
    "png palette": _saved("PNG", "P"),
    "png rgba": _saved("PNG", "RGBA"),
    "png la": _saved("PNG", "LA"),
    "png 1-bit": _saved("PNG", "1"),
    "png interlaced": _saved("PNG", optimize=False, interlace=1),
    "jpeg grey": _saved("JPEG", "L"),
    "jpeg cmyk": _saved("JPEG", "CMYK"),
    "jpeg progressive": _saved("JPEG", progressive=True),
    "jpeg 3000x10": _saved("JPEG", size=(3000, 10)),
    "mpo (jpeg magic)": _saved("MPO"),
}
IMAGES_REFUSED = {
    "empty": b"",
    "one byte": b"\x89",
    "png magic only": b"\x89PNG\r\n\x1a\n",
    "jpeg magic only": b"\xff\xd8\xff",
    "png claims 100000x100000": _png(100_000, 100_000, data=zlib.compress(b"")),
    "png claims 4001x4001": _png(4001, 4001, data=zlib.compress(b"")),
    "png width 0": _png(0, 10, data=zlib.compress(b"")),
    "png bad bit depth": _png(10, 10, depth=7),
    "png bad colour type": _png(10, 10, colour=5),
    "png truncated": png_bytes((1, 2, 3), size=(64, 64))[:-30],
    "png bad crc": png_bytes((1, 2, 3))[:29] + b"\0\0\0\0" + png_bytes((1, 2, 3))[33:],
    "png garbage idat": _png(50, 50, data=b"\x78\x9c" + bytes(range(256)) * 4),
    "jpeg claims 65535x65535": _jpeg_claiming(65535, 65535),
    "jpeg truncated": JPEG[: len(JPEG) // 3],
    "jpeg magic then eps": b"\xff\xd8\xff" + OTHER_FORMATS["EPS"],
    "png magic then tiff": b"\x89PNG\r\n\x1a\n" + OTHER_FORMATS["TIFF"],
}


@dataclass(frozen=True)
class Case:
    method: str
    payload: bytes
    codes: frozenset[C]
    says: str = ""  # what the message must contain


def _case(method: str, payload: bytes, *codes: C, says: str = "") -> Case:
    return Case(method, payload, frozenset(codes or {C.INVALID_ARGUMENT}), says)


NOT_VALID = "is not a valid"
LONG = "m" * 20_000
ZEROS = np.zeros((1, SIZE, SIZE, 3), np.uint8)
NAMED = frozenset({C.NOT_FOUND, C.INVALID_ARGUMENT})
CONTROL = frozenset({C.FAILED_PRECONDITION, C.INVALID_ARGUMENT, C.NOT_FOUND})


def _named(method: str, request: Message, *codes: C) -> Case:
    return _case(method, request.SerializeToString(), *(codes or NAMED))


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    # Bytes that are not a message at all (each method parses them itself).
    for n in (3, 64, 1000):
        for method in (INFER, CLASSIFY, EMBED, HEALTH, INV + "ModelMetadata"):
            payload = np.random.default_rng(n).bytes(n)
            cases[f"random {n} bytes -> {method}"] = _case(method, payload, says=NOT_VALID)
    wire = {
        "utf-8: model_name": (INFER, b"\x0a\x02\xff\xfe"),
        "utf-8: version": (INFER, b"\x12\x01\xc0"),
        "utf-8: classify model": (CLASSIFY, b"\x0a\x01\x80"),
        "utf-8: health service": (HEALTH, b"\x0a\x03\xed\xa0\x80"),
        "utf-8: input name": (INFER, b"\x2a\x04\x0a\x02\xff\xff"),
        "length past end: model_name": (INFER, b"\x0a\x7fab"),
        "length past end: images": (CLASSIFY, b"\x1a\xff\xff\x03abc"),
        "length past end: embed": (EMBED, b"\x1a\x10abc"),
        "length past end: raw contents": (INFER, _infer() + b"\x3a\x80\x80\x80\x08"),
        "varint too long": (INFER, b"\x18" + b"\xff" * 11),
        "end group without start": (INFER, b"\x0c"),
        "groups nested 2000 deep": (INFER, b"\xa3\x06" * 2000),
    }
    for name, (method, payload) in wire.items():
        cases[name] = _case(method, payload, says=NOT_VALID)
    cases["wrong wire type: an unknown field"] = _case(INFER, b"\x08\x01", *NAMED)
    cases["empty ModelInfer"] = _case(INFER, b"", *NAMED)
    cases["empty Classify"] = _case(CLASSIFY, b"", *NAMED)

    # Tensors whose arithmetic or form is wrong.
    huge = [2**32, 2**32, SIZE, 3]
    tensors = {
        "shape wraps int64 (raw)": (_tensor(huge), "larger than any"),
        "shape wraps int64 (typed)": (_tensor(huge, raw=None), "larger than any"),
        "shape 2**63-1": (_tensor([2**63 - 1, 1]), "needs 9223372036854775807"),
        "shape 0 x huge": (_tensor([0, 2**62, 2**62]), "larger than any"),
        "negative dimension": (_tensor([-1, SIZE, SIZE, 3]), "negative"),
        "33 dimensions": (_tensor([1] * 33), "dimensions"),
        "raw too short": (_tensor([1, SIZE, SIZE, 3], raw=b"x" * 10), "needs"),
        "typed count wrong": (_tensor([1, 2], raw=None, uint_contents=[1]), "needs 2"),
        "typed out of range": (_tensor([2], raw=None, uint_contents=[1, 300]), "range"),
        "datatype BYTES": (_tensor([1], "BYTES", b"x"), "unsupported datatype"),
        "datatype BF16": (_tensor([1], "BF16", b"xx"), "unsupported datatype"),
        "datatype 20 KB": (_tensor([1], LONG, b"x"), "characters"),
        "wrong dtype": (_tensor([1, SIZE, SIZE, 3], "FP32", bytes(SIZE * SIZE * 12)), "UINT8"),
        "wrong image size": (_tensor([1, 8, 8, 3], raw=bytes(192)), "shape"),
        "zero rows": (_tensor([0, SIZE, SIZE, 3]), "0 rows"),
        "no inputs": (_infer(), "missing"),
        "input name 20 KB": (_tensor([1], name=LONG, raw=b"x"), "characters"),
        "two raw for one input": (_infer(ZEROS) + b"\x3a\x00", "raw_input_contents"),
        "unknown output": (_infer(ZEROS) + b"\x32\x06\x0a\x04nope", "no outputs"),
    }
    for name, (payload, says) in tensors.items():
        cases[name] = _case(INFER, payload, says=says)

    # Names: unknown, hostile, huge (the error must not echo 20 KB back).
    cases["model unknown"] = _case(INFER, _infer(model_name="nope"), C.NOT_FOUND)
    cases["model name 20 KB"] = _case(INFER, _infer(model_name=LONG), *NAMED)
    cases["model name a path"] = _case(INFER, _infer(model_name="../tiny"), *NAMED)
    cases["version not a number"] = _case(INFER, _infer(model_version="x"), *NAMED)
    cases["version 99"] = _case(INFER, _infer(model_version="99"), C.NOT_FOUND)
    cases["classify model 20 KB"] = _case(CLASSIFY, _images(CLASSIFY, JPEG, model=LONG), *NAMED)
    cases["metadata 20 KB"] = _named(INV + "ModelMetadata", pb.ModelMetadataRequest(name=LONG))
    cases["ready 20 KB"] = _named(INV + "ModelReady", pb.ModelReadyRequest(name=LONG), C.OK)
    cases["config 20 KB"] = _named(INV + "ModelConfig", pb.ModelConfigRequest(name=LONG))
    statistics = pb.ModelStatisticsRequest(name=LONG)
    cases["statistics 20 KB"] = _named(INV + "ModelStatistics", statistics)
    load = pb.RepositoryModelLoadRequest(model_name="../../etc")
    cases["load ../../etc"] = _named(INV + "RepositoryModelLoad", load, *CONTROL)
    unload = pb.RepositoryModelUnloadRequest(model_name=LONG)
    cases["unload 20 KB"] = _named(INV + "RepositoryModelUnload", unload, *CONTROL)
    health = health_pb2.HealthCheckRequest(service=LONG)
    cases["health service 20 KB"] = _named(HEALTH, health, C.NOT_FOUND)

    # Methods that do not exist.
    cases["unknown method"] = _case(INV + "Nope", b"", C.UNIMPLEMENTED)
    cases["unknown service"] = _case("/nope.Nope/Nope", b"\x0a\x01a", C.UNIMPLEMENTED)
    cases["method name 5 KB"] = _case("/" + "x" * 5000 + "/y", b"", C.UNIMPLEMENTED)

    # Images: only JPEG and PNG, checked before any decoder plugin sees them.
    for name, data in OTHER_FORMATS.items():
        cases[f"format {name}"] = _case(CLASSIFY, _images(CLASSIFY, data), says="not JPEG or PNG")
    for name, data in IMAGES_REFUSED.items():
        cases[f"image {name}"] = _case(CLASSIFY, _images(CLASSIFY, data), says="image 0")
    for name, data in IMAGES_OK.items():
        cases[f"image {name}"] = _case(CLASSIFY, _images(CLASSIFY, data), C.OK)
    for name, data in list(IMAGES_REFUSED.items())[:6]:
        cases[f"embed {name}"] = _case(EMBED, _images(EMBED, data), says="image 0")
    eps = OTHER_FORMATS["EPS"]
    cases["embed eps"] = _case(EMBED, _images(EMBED, eps), says="not JPEG or PNG")
    cases["embed 4000x1"] = _case(EMBED, _images(EMBED, _png(4000, 1)), C.OK)
    cases["second image bad"] = _case(CLASSIFY, _images(CLASSIFY, JPEG, b"GIF89a"), says="image 1")
    cases["no images"] = _case(CLASSIFY, _images(CLASSIFY), says="no images")
    too_many = _images(CLASSIFY, *[JPEG] * (MAX_IMAGES + 1))
    cases["too many images"] = _case(CLASSIFY, too_many, says="limit")
    over_budget = _images(CLASSIFY, *[_png(4000, 2000)] * 3)
    cases["pixel budget"] = _case(CLASSIFY, over_budget, says="per request")
    cases["top_k huge"] = _case(CLASSIFY, _images(CLASSIFY, JPEG, top_k=2**32 - 1), C.OK)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_a_malformed_request_gets_a_clear_code(served: Served, name: str) -> None:
    case = CASES[name]
    code, details, _ = served.call(case.method, case.payload)
    assert code in case.codes, f"{name}: {code} {details!r}"
    assert case.says in details, details
    assert len(details) < 1000  # never the caller's value echoed in full


def test_an_extreme_aspect_ratio_costs_no_more_than_a_normal_image(served: Served) -> None:
    peak = served.rss_mb("VmHWM")
    for _ in range(3):
        assert served.call(CLASSIFY, _images(CLASSIFY, _png(4000, 1)))[0] == C.OK
    # It was resized to ~1,000,000 x 256 before the crop: a peak of 1 GB more.
    assert served.rss_mb("VmHWM") < peak + 100


# --- streams: a bad message is answered and the stream goes on ---------------------------


def _stream(
    served: Served, method: str, parse: Callable[[bytes], object], messages: list[bytes]
) -> list:  # type: ignore[type-arg]
    call = served.channel.stream_stream(method, response_deserializer=parse)
    return list(call(iter(messages), timeout=30))


def test_model_stream_infer_answers_each_bad_message_and_goes_on(served: Served) -> None:
    good = _infer(np.zeros((1, SIZE, SIZE, 3), np.uint8), id="good")
    wraps = _tensor([2**32, 2**32, SIZE, 3])
    unknown = _infer(model_name="nope", id="nope")
    noise = np.random.default_rng(5).bytes(300)
    messages = [good, b"\x0a\x7f", good, b"\x0a\x02\xff\xfe", wraps, unknown, noise, good]
    answers = _stream(
        served, INV + "ModelStreamInfer", pb.ModelStreamInferResponse.FromString, messages
    )
    errors = [a.error_message.split(":")[0] for a in answers]
    assert errors == ["", "INVALID_ARGUMENT", "", "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                      "NOT_FOUND", "INVALID_ARGUMENT", ""]  # fmt: skip
    ids = [a.infer_response.id for a in answers]
    assert ids == ["good", "", "good", "", "", "nope", "", "good"]
    assert NOT_VALID in answers[1].error_message


def test_classify_stream_answers_each_bad_message_and_goes_on(served: Served) -> None:
    good = _images(CLASSIFY, png_bytes((250, 0, 0)), id="red")
    eps = _images(CLASSIFY, OTHER_FORMATS["EPS"])
    thin = _images(CLASSIFY, _png(4000, 1))
    bomb = _images(CLASSIFY, IMAGES_REFUSED["png claims 100000x100000"])
    messages = [good, b"\xff" * 40, eps, thin, bomb, b"\x1a\x10abc", good]
    answers = _stream(
        served,
        "/tlserve.v1.ImageService/ClassifyStream",
        v1.ClassifyStreamResponse.FromString,
        messages,
    )
    errors = [a.error_message.split(":")[0] for a in answers]
    assert errors == [
        "",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "",
    ]
    assert answers[0].response.results[0].labels[0].label == "red"
    assert answers[-1].response.id == "red"


def test_a_stream_of_garbage_is_answered_message_by_message(served: Served) -> None:
    rng = np.random.default_rng(9)
    messages = [b"\x0a\x7f" + rng.bytes(20) for _ in range(60)]
    answers = _stream(
        served, INV + "ModelStreamInfer", pb.ModelStreamInferResponse.FromString, messages
    )
    assert len(answers) == 60
    assert all(a.error_message.startswith("INVALID_ARGUMENT: ") for a in answers)


STREAMS = {
    INV + "ModelStreamInfer": (pb.ModelStreamInferResponse.FromString, "infer_response"),
    CLASSIFY + "Stream": (v1.ClassifyStreamResponse.FromString, "response"),
}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(sorted(STREAMS)),
    messages=st.lists(st.one_of(st.binary(max_size=64), st.just(b"")), min_size=1, max_size=6),
    good_at=st.integers(0, 6),
)
def test_a_stream_answers_every_message_whatever_its_bytes(
    served: Served, method: str, messages: list[bytes], good_at: int
) -> None:
    parse, _ = STREAMS[method]
    good = VALID[0][1] if "Infer" in method else VALID[1][1]
    messages.insert(min(good_at, len(messages)), good)
    answers = _stream(served, method, parse, messages)
    assert len(answers) == len(messages)
    for answer in answers:
        code = answer.error_message.split(":")[0]  # type: ignore[attr-defined]
        assert code in {"", "INVALID_ARGUMENT", "NOT_FOUND"}, answer


def test_health_watch_refuses_bytes_that_do_not_parse(served: Served) -> None:
    watch = served.channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as caught:
        list(watch(b"\x0a\x05ab", timeout=10))
    assert caught.value.code() == C.INVALID_ARGUMENT  # type: ignore[attr-defined]


# --- hypothesis: random bytes everywhere, mutations of valid messages --------------------


@FUZZ
@given(method=st.sampled_from(UNARY_METHODS), payload=st.binary(max_size=300))
def test_random_bytes_to_any_method_get_a_clear_code(
    served: Served, method: str, payload: bytes
) -> None:
    code, details, _ = served.call(method, payload)
    assert code in CLEAR, (method, payload, code, details)


VALID = [
    (INFER, _infer(np.full((1, SIZE, SIZE, 3), 9, np.uint8))),
    (CLASSIFY, _images(CLASSIFY, JPEG, png_bytes((0, 200, 0)), top_k=2)),
    (EMBED, _images(EMBED, png_bytes((0, 0, 200), size=(40, 9)))),
]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request's bytes, truncated, with bytes flipped, or with bytes spliced in."""
    method, payload = draw(st.sampled_from(VALID))
    data = bytearray(payload)
    kind = draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        return method, bytes(data[: draw(st.integers(0, len(data) - 1))])
    # Most mutations land in the header, where the structure is.
    positions = draw(st.lists(st.integers(0, min(len(data) - 1, 400)), min_size=1, max_size=6))
    if kind == "flip":
        for position in positions:
            data[position] ^= draw(st.integers(1, 255))
        return method, bytes(data)
    at = positions[0]
    return method, bytes(data[:at]) + draw(st.binary(max_size=16)) + bytes(data[at:])


@FUZZ
@given(request=mutated())
def test_mutated_valid_requests_get_a_clear_code(
    served: Served, request: tuple[str, bytes]
) -> None:
    code, details, _ = served.call(*request)
    assert code in CLEAR, (request[0], code, details)


# --- afterwards: alive, correct, counted, quiet, and no bigger ---------------------------
# Each test below sends its own hostile traffic first, so it judges what it saw
# whether it runs alone, first, or after the rest of this module.


def _hostile_traffic(served: Served, rounds: int) -> None:
    """Garbage to every unary method, mutated valid requests, and unknown methods."""
    rng = np.random.default_rng(rounds)
    for i in range(rounds):
        for method in UNARY_METHODS:
            served.call(method, rng.integers(0, 256, 1 + i % 200, np.uint8).tobytes())
        for method, payload in VALID:
            served.call(method, payload[: len(payload) * (i % 7 + 1) // 8])
        served.call(f"/no.such.Service/Method{i % 3}", b"\x00")


def test_afterwards_the_server_is_alive_correct_counted_and_quiet(served: Served) -> None:
    _hostile_traffic(served, rounds=12)
    _check_answers_correctly(served)
    assert served.process.poll() is None
    metrics = served.metrics()
    outcomes = re.findall(
        r'tlserve_requests_total\{api="(\w+)",model="(\w+)",outcome="(\w+)"\} (\S+)', metrics
    )
    assert outcomes
    assert not [o for o in outcomes if o[2] in {"INTERNAL", "UNKNOWN"}], outcomes
    counted = {(api, model, outcome): float(n) for api, model, outcome, n in outcomes}
    # Requests that never reached a servicer are counted too.
    assert counted[("ModelInfer", "unknown", "INVALID_ARGUMENT")] >= 10
    assert counted[("Check", "unknown", "INVALID_ARGUMENT")] >= 3
    assert counted[("unknown", "unknown", "UNIMPLEMENTED")] >= 3
    log = served.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    # One WARNING line a second at most, however many requests were refused.
    refusals = log.count("refused ")
    assert refusals < 120, refusals


def test_rss_after_the_suite_is_within_one_and_a_half_times_before(served: Served) -> None:
    _hostile_traffic(served, rounds=60)
    after = served.rss_mb()
    assert after < served.rss_before_mb * 1.5, (served.rss_before_mb, after)
