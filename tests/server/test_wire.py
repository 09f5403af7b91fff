"""Reading a request's model name from its bytes without parsing them."""

from __future__ import annotations

import numpy as np

from tlserve.contract.codec import encode_request_inputs
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.server.edge.wire import model_name


def test_the_model_name_is_found_past_large_fields_in_any_order() -> None:
    request = pb.ModelInferRequest(model_name="fashion", model_version="2", id="call-1")
    images = np.zeros((1, 224, 224, 3), np.uint8)
    encode_request_inputs(request, {"images": images})
    raw = request.SerializeToString()
    assert len(raw) > 150_000 and model_name(raw) == "fashion"
    # Field order is the writer's choice; the last occurrence wins, as in protobuf.
    moved = raw[len(b"\x0a\x07fashion") :] + b"\x0a\x07fashion"
    assert pb.ModelInferRequest.FromString(moved).model_name == "fashion"
    assert model_name(moved) == "fashion"
    assert model_name(b"\x0a\x01a" + b"\x0a\x01b") == "b"
    classify = v1.ClassifyRequest(model_name="défauts", images=[b"\x89PNG" * 100])
    assert model_name(classify.SerializeToString()) == "défauts"


def test_bytes_that_are_no_message_name_no_model() -> None:
    assert model_name(b"") is None  # no field 1: the empty name is not a model
    assert model_name(pb.ModelInferRequest(id="x").SerializeToString()) is None
    assert model_name(b"\x0a\x7fabc") is None  # a length past the end
    assert model_name(b"\x0a\x02\xff\xfe") is None  # not UTF-8
    assert model_name(b"\x0b") is None  # a group: not in these messages
    assert model_name(b"\x08" + b"\xff" * 11) is None  # a varint that never ends
    assert model_name(b"\x0a\x01a\x0d\x00") is None  # a fixed32 cut short
    assert model_name(np.random.default_rng(0).bytes(4096)) is None
