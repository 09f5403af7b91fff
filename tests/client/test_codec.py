"""numpy <-> Open Inference Protocol tensors: what both ends of the wire agree on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tlserve.contract.codec import (
    DATATYPES,
    datatype_of,
    decode_request_inputs,
    decode_response_outputs,
    dtype_of,
    encode_request_inputs,
    encode_response_outputs,
)
from tlserve.contract.errors import InvalidInput
from tlserve.protos import grpc_service_pb2 as pb


def _sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Values that use the dtype's range (negatives, large magnitudes, fractions)."""
    dtype = DATATYPES[datatype]
    rng = np.random.default_rng(7)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        values.flat[0] = info.min
        values.flat[-1] = info.max
        return values
    return (rng.standard_normal(shape) * 1000).astype(dtype)


def _request_round_trip(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(model_name="m")
    encode_request_inputs(request, inputs)
    # Through the wire format too, as the server would receive it.
    return decode_request_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))


def _response_round_trip(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    response = pb.ModelInferResponse(model_name="m")
    encode_response_outputs(response, outputs)
    return decode_response_outputs(pb.ModelInferResponse.FromString(response.SerializeToString()))


ROUND_TRIPS: list[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = [
    _request_round_trip,
    _response_round_trip,
]


@pytest.mark.parametrize("round_trip", ROUND_TRIPS, ids=["request", "response"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_raw_round_trip_keeps_values_dtype_and_shape(
    round_trip: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], datatype: str
) -> None:
    array = _sample(datatype)
    [(name, back)] = round_trip({"x": array}).items()
    assert name == "x"
    assert back.dtype == DATATYPES[datatype]
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("round_trip", ROUND_TRIPS, ids=["request", "response"])
def test_several_tensors_keep_their_names_and_order(
    round_trip: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> None:
    tensors = {
        "images": _sample("UINT8", (2, 4, 4, 3)),
        "scale": np.array([0.5], dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.int64),
    }
    back = round_trip(tensors)
    assert list(back) == list(tensors)
    for name, array in tensors.items():
        assert back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)


@pytest.mark.parametrize("round_trip", ROUND_TRIPS, ids=["request", "response"])
def test_scalar_tensor_keeps_its_empty_shape(
    round_trip: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> None:
    back = round_trip({"threshold": np.array(0.5, dtype=np.float32)})["threshold"]
    assert back.shape == ()
    assert back == np.float32(0.5)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],  # strided view
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        np.arange(10, dtype=np.uint8)[::-1],
    ],
    ids=["strided", "fortran", "reversed"],
)
def test_non_contiguous_arrays_are_sent_in_logical_order(array: np.ndarray) -> None:
    back = _request_round_trip({"x": array})["x"]
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
    ("big_endian", "datatype"),
    [(">i4", "INT32"), (">u2", "UINT16"), (">f8", "FP64"), (">f2", "FP16"), (">i8", "INT64")],
)
def test_big_endian_arrays_are_sent_little_endian(big_endian: str, datatype: str) -> None:
    values = np.array([[1, 2, 300], [7, 0, 1000]])
    array = values.astype(big_endian)
    request = pb.ModelInferRequest()
    encode_request_inputs(request, {"x": array})
    assert request.inputs[0].datatype == datatype
    assert request.raw_input_contents[0] == values.astype("<" + big_endian[1:]).tobytes()
    back = decode_request_inputs(request)["x"]
    assert back.dtype.byteorder in ("<", "=", "|")
    np.testing.assert_array_equal(back, values)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("BOOL", "bool_contents", [True, False, True, True, False, False]),
        ("UINT8", "uint_contents", [0, 1, 2, 127, 200, 255]),
        ("UINT16", "uint_contents", [0, 1, 2, 3, 40000, 65535]),
        ("UINT32", "uint_contents", [0, 1, 2, 3, 4, 2**32 - 1]),
        ("UINT64", "uint64_contents", [0, 1, 2, 3, 4, 2**64 - 1]),
        ("INT8", "int_contents", [-128, -1, 0, 1, 2, 127]),
        ("INT16", "int_contents", [-32768, -1, 0, 1, 2, 32767]),
        ("INT32", "int_contents", [-(2**31), -1, 0, 1, 2, 2**31 - 1]),
        ("INT64", "int64_contents", [-(2**63), -1, 0, 1, 2, 2**63 - 1]),
        ("FP32", "fp32_contents", [-1.5, 0.0, 0.25, 3.0, 1e30, -1e-30]),
        ("FP64", "fp64_contents", [-1.5, 0.0, 0.25, 3.0, 1e300, -1e-300]),
    ],
)
def test_typed_contents_decode_to_the_datatype(
    datatype: str, field: str, values: list[Any]
) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, field).extend(values)
    array = decode_request_inputs(request)["x"]
    assert array.dtype == DATATYPES[datatype]
    assert array.shape == (2, 3)
    np.testing.assert_array_equal(array, np.array(values, dtype=DATATYPES[datatype]).reshape(2, 3))

    response = pb.ModelInferResponse()
    tensor = response.outputs.add(name="y", datatype=datatype, shape=[3, 2])
    getattr(tensor.contents, field).extend(values)
    out = decode_response_outputs(response)["y"]
    assert out.dtype == DATATYPES[datatype]
    np.testing.assert_array_equal(out.ravel(), np.array(values, dtype=DATATYPES[datatype]))


def test_fp16_typed_contents_are_refused_with_a_hint() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="'x': FP16 must be sent as raw contents"):
        decode_request_inputs(request)


def test_datatype_and_dtype_lookups() -> None:
    for name, dtype in DATATYPES.items():
        assert dtype_of(name) == dtype
        assert datatype_of(dtype) == name
        assert datatype_of(dtype.newbyteorder(">")) == name
    assert datatype_of(np.dtype(np.float32)) == "FP32"  # native order
    with pytest.raises(InvalidInput, match="numpy dtype <U3 has no Open Inference Protocol"):
        datatype_of(np.dtype("<U3"))
    with pytest.raises(InvalidInput, match="unsupported datatype 'BYTES'; supported: BOOL, "):
        dtype_of("BYTES")


def test_encoding_an_unsupported_dtype_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="complex128"):
        encode_request_inputs(pb.ModelInferRequest(), {"x": np.zeros(2, dtype=np.complex128)})


# --- malformed requests: each fails with InvalidInput and a message saying what is wrong


def _raw_request(
    *tensors: tuple[str, str, list[int]], raw: list[bytes] | None = None
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw or [])
    return request


def test_raw_length_mismatch_names_the_input_and_sizes() -> None:
    request = _raw_request(("x", "FP32", [2, 3]), raw=[b"\0" * 20])
    with pytest.raises(
        InvalidInput,
        match=r"input 'x': raw contents are 20 bytes but shape \[2, 3\] of FP32 "
        r"needs 24",
    ):
        decode_request_inputs(request)


def test_typed_count_mismatch_names_the_field() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT32", shape=[2, 2]).contents.int_contents.extend(
        [1, 2, 3]
    )
    with pytest.raises(
        InvalidInput, match=r"input 'x': 3 values in int_contents but shape \[2, 2\] needs 4"
    ):
        decode_request_inputs(request)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_negative_dimension_is_refused(raw: bool) -> None:
    request = _raw_request(("x", "FP32", [-1, 4]), raw=[b"\0" * 16] if raw else None)
    with pytest.raises(InvalidInput, match=r"'x': shape \[-1, 4\] has a negative dimension"):
        decode_request_inputs(request)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_unsupported_datatype_string_lists_the_supported_ones(raw: bool) -> None:
    request = _raw_request(("x", "FP128", [1]), raw=[b"\0" * 16] if raw else None)
    with pytest.raises(InvalidInput, match=r"unsupported datatype 'FP128'; supported: .*FP32"):
        decode_request_inputs(request)


@pytest.mark.parametrize("n_raw", [1, 3])
def test_raw_count_must_match_the_inputs(n_raw: int) -> None:
    request = _raw_request(("a", "UINT8", [1]), ("b", "UINT8", [1]), raw=[b"\1"] * n_raw)
    with pytest.raises(
        InvalidInput, match=f"{n_raw} raw_input_contents for 2 inputs; send one per input"
    ):
        decode_request_inputs(request)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_an_input_given_twice_is_refused(raw: bool) -> None:
    request = _raw_request(
        ("x", "UINT8", [1]), ("x", "UINT8", [1]), raw=[b"\1", b"\2"] if raw else None
    )
    if not raw:
        for tensor in request.inputs:
            tensor.contents.uint_contents.append(1)
    with pytest.raises(InvalidInput, match="input 'x' is given twice"):
        decode_request_inputs(request)


def test_mixing_typed_and_raw_contents_is_refused() -> None:
    request = _raw_request(("a", "UINT8", [1]), ("b", "UINT8", [1]), raw=[b"\1", b""])
    request.inputs[1].contents.uint_contents.append(2)
    with pytest.raises(
        InvalidInput, match="input 'b' has typed contents but the request uses raw_input_contents"
    ):
        decode_request_inputs(request)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("UINT8", "uint_contents", [0, 256]),
        ("UINT16", "uint_contents", [65536, 0]),
        ("INT8", "int_contents", [-129, 0]),
        ("INT8", "int_contents", [0, 128]),
        ("INT16", "int_contents", [40000, 0]),
    ],
)
def test_typed_values_out_of_range_are_refused_not_wrapped(
    datatype: str, field: str, values: list[int]
) -> None:
    request = pb.ModelInferRequest()
    getattr(request.inputs.add(name="x", datatype=datatype, shape=[2]).contents, field).extend(
        values
    )
    with pytest.raises(InvalidInput, match=f"input 'x': values out of range for {datatype}"):
        decode_request_inputs(request)


def test_response_raw_length_mismatch_is_invalid_input() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="y", datatype="FP32", shape=[3])
    response.raw_output_contents.append(b"\0" * 8)
    with pytest.raises(InvalidInput, match="raw contents are 8 bytes"):
        decode_response_outputs(response)


def test_response_with_fewer_raw_contents_than_outputs_is_invalid_input() -> None:
    response = pb.ModelInferResponse()
    encode_response_outputs(response, {"a": np.zeros(2), "b": np.ones(3)})
    del response.raw_output_contents[1]
    with pytest.raises(InvalidInput, match="raw_output_contents"):
        decode_response_outputs(response)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([4294967296, 4294967296, 224, 3], "larger than any"),  # 0 elements in int64
        ([2**62, 2**62, 0], "larger than any array can be"),
        ([1] * 33, "33 dimensions; at most 32"),
    ],
)
def test_shapes_whose_size_wraps_in_int64_are_refused(
    raw: bool, shape: list[int], message: str
) -> None:
    request = _raw_request(("x", "UINT8", shape), raw=[b""] if raw else None)
    with pytest.raises(InvalidInput, match=message):
        decode_request_inputs(request)


def test_a_long_input_name_is_echoed_cut_short() -> None:
    request = _raw_request(("n" * 20_000, "UINT8", [2]), raw=[b"\0"])
    with pytest.raises(InvalidInput, match=r"\(20000 characters\)") as caught:
        decode_request_inputs(request)
    assert len(str(caught.value)) < 300
