"""Garbage in, a clear status out: fuzz the decode paths of a real server.

Every malformed request must get INVALID_ARGUMENT or NOT_FOUND (or OK when
the mutation happens to still be valid), never INTERNAL, UNKNOWN or a hang,
and the server must keep serving afterwards. Bounded: a few hundred calls.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.support import TINY_SIZE, ServerThread, build_tiny_classifier, png_bytes
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc

CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16", "uint8", "", "COMPLEX"]  # fmt: skip
TYPED_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents",
                "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("fuzz") / "models"
    build_tiny_classifier(repo / "tiny" / "1" / "model.onnx")
    running = ServerThread(repo)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


def _jpeg() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 48, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


SEEDS = [png_bytes((200, 10, 10), size=(33, 21)), _jpeg()]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real PNG or JPEG, truncated, with bytes flipped, or plain garbage."""
    kind = draw(st.sampled_from(["garbage", "truncate", "flip", "splice"]))
    if kind == "garbage":
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    positions = draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8))
    if kind == "flip":
        for position in positions:
            data[position] ^= draw(st.integers(1, 255))
        return bytes(data)
    at = positions[0]
    return bytes(data[:at]) + draw(st.binary(max_size=64)) + bytes(data[at:])


@FUZZ
@given(images=st.lists(mutated_images(), min_size=1, max_size=3), top_k=st.integers(0, 10))
def test_classify_never_fails_unclearly(
    channel: grpc.Channel, images: list[bytes], top_k: int
) -> None:
    stub = v1_grpc.ImageServiceStub(channel)
    request = v1.ClassifyRequest(model_name="tiny", images=images, top_k=top_k)
    assert _code(lambda: stub.Classify(request, timeout=10)) in CLEAR


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["tiny", "tiny", "tiny", "", "nope", "../tiny"])),
        model_version=draw(st.sampled_from(["", "", "1", "2", "x"])),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["images", "images", "other", ""])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(
                st.one_of(
                    st.just([1, TINY_SIZE, TINY_SIZE, 3]),
                    st.lists(st.integers(-2, 12), max_size=5),
                )
            ),
        )
        if raw:
            size = draw(st.sampled_from([0, 1, 3 * TINY_SIZE * TINY_SIZE, 1000]))
            request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
        else:
            field = draw(st.sampled_from(TYPED_FIELDS))
            count = draw(st.sampled_from([0, 1, 3 * TINY_SIZE * TINY_SIZE]))
            values = {
                "bool_contents": st.booleans(),
                "bytes_contents": st.binary(max_size=4),
                "fp32_contents": st.floats(width=32, allow_nan=True),
                "fp64_contents": st.floats(allow_nan=True),
                "int_contents": st.integers(-(2**31), 2**31 - 1),
                "int64_contents": st.integers(-(2**63), 2**63 - 1),
                "uint_contents": st.integers(0, 2**32 - 1),
                "uint64_contents": st.integers(0, 2**64 - 1),
            }[field]
            first = draw(values)
            getattr(tensor.contents, field).extend([first] * count)
    if draw(st.booleans()):
        request.outputs.add(name=draw(st.sampled_from(["probabilities", "nope", ""])))
    return request


@FUZZ
@given(request=infer_requests())
def test_model_infer_never_fails_unclearly(
    channel: grpc.Channel, request: pb.ModelInferRequest
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert _code(lambda: stub.ModelInfer(request, timeout=10)) in CLEAR


def test_server_still_serves_after_the_fuzzing(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    reply = v1_grpc.ImageServiceStub(channel).Classify(
        v1.ClassifyRequest(model_name="tiny", images=[png_bytes((5, 5, 250))]), timeout=5
    )
    assert reply.results[0].labels[0].label == "blue"
