"""KServe v2 REST tensors: JSON and the binary-data extension <-> arrays.

The JSON form carries each tensor's values in ``data`` (flat or nested,
row-major); the binary-data extension (Triton's) puts a JSON header of
``Inference-Header-Content-Length`` bytes first and the tensors' raw bytes
after it, each input saying its size in ``parameters.binary_data_size``.

Both end as the gRPC ``ModelInferRequest`` they mean, decoded by
:func:`tlserve.contract.codec.decode_request_inputs`: the shape, size and
datatype rules are the contract's, once, and a REST request passes exactly
the checks a gRPC one does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlserve.contract.codec import datatype_of, decode_request_inputs, dtype_of
from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import shown
from tlserve.protos import grpc_service_pb2 as pb

__all__ = ["HEADER_LENGTH", "InferRequest", "encode_response", "parse_infer_request"]

#: Triton's binary-data extension: the JSON part's length, the rest is tensors.
HEADER_LENGTH = "inference-header-content-length"

_INTEGER_KINDS = "iu"


@dataclass
class InferRequest:
    """A parsed REST infer request: its arrays and what the answer should hold."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str] = field(default_factory=list)
    binary_outputs: set[str] = field(default_factory=set)
    all_binary: bool = False


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _parameters(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    return _object(value.get("parameters", {}), f"{what}'s parameters")


def _json_values(name: str, datatype: str, data: Any) -> bytes:
    """The little-endian bytes of ``data`` as ``datatype``; InvalidInput if any value is off."""
    dtype = dtype_of(datatype)
    if not isinstance(data, list):
        raise InvalidInput(f"input {shown(name)}: data must be a JSON array")
    try:
        values = np.array(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(f"input {shown(name)}: data is not a regular array: {exc}") from exc
    if values.size == 0:
        values = values.astype(dtype)
    kind = values.dtype.kind
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind in _INTEGER_KINDS:
        ok = kind in _INTEGER_KINDS
        if ok and values.size:
            info = np.iinfo(dtype)
            ok = info.min <= int(values.min()) and int(values.max()) <= info.max
    else:
        ok = kind in _INTEGER_KINDS + "f"
    if not ok:
        raise InvalidInput(f"input {shown(name)}: data holds values that are not {datatype}")
    return values.astype(dtype.newbyteorder("<")).tobytes()


def _shape(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidInput(f"input {shown(name)}: shape must be an array of integers")
    if any(not -(2**63) <= d < 2**63 for d in value):
        raise InvalidInput(f"input {shown(name)}: shape {shown(str(value))} is out of range")
    return value


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """The request's arrays and asked-for outputs; ``header_length``: the binary extension's."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} is outside the body "
                f"({len(body)} bytes)"
            )
        header, binary = body[:header_length], body[header_length:]
    try:
        document = json.loads(header)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"the request is not valid JSON: {exc}") from exc
    request = _object(document, "the request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request needs 'inputs', a non-empty array of tensors")
    message = pb.ModelInferRequest()
    offset = 0
    for index, item in enumerate(inputs):
        tensor = _object(item, f"inputs[{index}]")
        name, datatype = tensor.get("name"), tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"inputs[{index}] needs a string 'name' and 'datatype'")
        shape = _shape(name, tensor.get("shape"))
        size = _parameters(tensor, f"input {shown(name)}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input {shown(name)}: binary_data_size must be an integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {shown(name)}: binary_data_size {size} runs past the body's "
                    f"{len(binary)} bytes of binary data"
                )
            raw, offset = binary[offset : offset + size], offset + size
        elif "data" in tensor:
            raw = _json_values(name, datatype, tensor["data"])
        else:
            raise InvalidInput(f"input {shown(name)} has neither 'data' nor binary_data_size")
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size"
        )
    parsed = InferRequest(id=_string(request.get("id", ""), "id"), inputs={})
    parsed.inputs = decode_request_inputs(message)
    parsed.all_binary = bool(_parameters(request, "the request").get("binary_data_output"))
    for index, item in enumerate(_array(request.get("outputs", []), "outputs")):
        wanted = _object(item, f"outputs[{index}]")
        name = _string(wanted.get("name"), f"outputs[{index}].name")
        parsed.outputs.append(name)
        if _parameters(wanted, f"output {shown(name)}").get("binary_data"):
            parsed.binary_outputs.add(name)
    return parsed


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return value


def _array(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be an array")
    return value


def encode_response(
    head: dict[str, Any], outputs: Mapping[str, np.ndarray], request: InferRequest
) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON part's length when it carries binary outputs."""
    tensors, chunks = [], []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array)
        tensor: dict[str, Any] = {
            "name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape),
        }  # fmt: skip
        if request.all_binary or name in request.binary_outputs:
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _finite(array.ravel().tolist())
        tensors.append(tensor)
    header = json.dumps({**head, "outputs": tensors}, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _finite(values: list[Any]) -> list[Any]:
    # JSON has no NaN or infinity; they travel as null (what a JSON parser can read).
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
    return values
