"""numpy arrays <-> Open Inference Protocol tensors, in one place.

The client encodes with it and the server decodes with it (and the other way
round for outputs), so both sides agree on datatypes, byte order and the
checks that a malformed tensor fails.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import shown
from tlserve.protos import grpc_service_pb2 as pb

__all__ = [
    "DATATYPES",
    "datatype_of",
    "decode_request_inputs",
    "decode_response_outputs",
    "dtype_of",
    "encode_request_inputs",
    "encode_response_outputs",
]

# V2 datatype name -> numpy dtype (little-endian, as the protocol's raw form).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

# Which typed-contents field carries each datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


_NARROW = {"INT8", "INT16", "UINT8", "UINT16"}


def dtype_of(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name; InvalidInput if unsupported."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidInput(
            f"unsupported datatype {shown(datatype)}; supported: {', '.join(DATATYPES)}"
        ) from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("<")
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


# More dimensions than any model takes, and under numpy's own limit (64).
_MAX_DIMS = 32


def _check_shape(name: str, shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """The shape as ints, or InvalidInput; arithmetic in Python ints, so nothing wraps.

    A shape like ``[2**32, 2**32, 224, 3]`` has 0 elements in int64; it is
    refused here, not left for ``reshape`` to fail on.
    """
    dims = [int(dim) for dim in shape]
    if len(dims) > _MAX_DIMS:
        raise InvalidInput(f"input {shown(name)}: {len(dims)} dimensions; at most {_MAX_DIMS}")
    if any(dim < 0 for dim in dims):
        raise InvalidInput(f"input {shown(name)}: shape {dims} has a negative dimension")
    # numpy refuses an array whose non-zero dimensions multiply past its
    # address space even when another dimension is 0.
    if math.prod(dim for dim in dims if dim) * itemsize > sys.maxsize:
        raise InvalidInput(f"input {shown(name)}: shape {dims} is larger than any array can be")
    return tuple(dims)


def _from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    dtype = dtype_of(datatype)
    dims = _check_shape(name, shape, dtype.itemsize)
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {shown(name)}: raw contents are {len(raw)} bytes but shape {list(dims)} "
            f"of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _from_typed(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    dtype = dtype_of(datatype)
    dims = _check_shape(name, shape, dtype.itemsize)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {shown(name)}: {datatype} must be sent as raw contents")
    values = getattr(contents, field)
    count = math.prod(dims)
    if len(values) != count:
        raise InvalidInput(
            f"input {shown(name)}: {len(values)} values in {field} but shape {list(dims)} "
            f"needs {count}"
        )
    if datatype in _NARROW:
        # int_contents/uint_contents are 32-bit: check the narrower type's range.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"input {shown(name)}: values out of range for {datatype}")
        return wide.astype(dtype).reshape(dims)
    return np.array(values, dtype=dtype).reshape(dims)


def decode_request_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, whether raw or typed."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidInput(f"input {shown(tensor.name)} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {shown(tensor.name)} has typed contents but the request uses "
                    "raw_input_contents; use one form for all inputs"
                )
            arrays[tensor.name] = _from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            arrays[tensor.name] = _from_typed(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents
            )
    return arrays


def encode_request_inputs(request: pb.ModelInferRequest, inputs: dict[str, np.ndarray]) -> None:
    """Add the arrays to the request as raw contents (the fast path)."""
    for name, array in inputs.items():
        array = np.asarray(array)
        request.inputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())


def encode_response_outputs(
    response: pb.ModelInferResponse, outputs: dict[str, np.ndarray]
) -> None:
    """Add the arrays to the response as raw contents."""
    for name, array in outputs.items():
        array = np.asarray(array)
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())


def decode_response_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's output tensors as arrays, whether raw or typed."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InvalidInput(f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        if raw:
            arrays[tensor.name] = _from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            arrays[tensor.name] = _from_typed(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents
            )
    return arrays
