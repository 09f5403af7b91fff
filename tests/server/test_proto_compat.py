"""Our inference.* messages agree with tritonclient's, field by field."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton_pb2

from tlserve.protos import grpc_service_pb2 as ours_pb2

# Fields tlserve adds (documented in the .proto); V2 clients ignore them.
EXTENSIONS = {
    ("inference.ServerMetadataResponse", "parameters"),
    ("inference.ModelMetadataResponse", "parameters"),
}


def _messages(descriptor: Descriptor) -> list[Descriptor]:
    found = [descriptor]
    for nested in descriptor.nested_types:
        found.extend(_messages(nested))
    return found


def test_every_shared_message_has_the_same_field_numbers_and_types() -> None:
    theirs = {
        m.full_name: m
        for top in triton_pb2.DESCRIPTOR.message_types_by_name.values()
        for m in _messages(top)
    }
    checked = 0
    for top in ours_pb2.DESCRIPTOR.message_types_by_name.values():
        for message in _messages(top):
            other = theirs.get(message.full_name)
            if other is None or message.GetOptions().map_entry:
                continue
            for field in message.fields:
                if (message.full_name, field.name) in EXTENSIONS:
                    assert field.number not in other.fields_by_number, field.full_name
                    continue
                twin = other.fields_by_name.get(field.name)
                assert twin is not None, f"{field.full_name} is not in tritonclient's proto"
                assert (field.number, field.type, field.is_repeated) == (
                    twin.number,
                    twin.type,
                    twin.is_repeated,
                ), field.full_name
                checked += 1
    assert checked > 80


def test_every_rpc_has_triton_s_request_and_response_types() -> None:
    ours = ours_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.methods:
        twin = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == twin.input_type.full_name
        assert method.output_type.full_name == twin.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            twin.client_streaming,
            twin.server_streaming,
        )
