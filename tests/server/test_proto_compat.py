"""Our inference.* messages agree with tritonclient's, field by field."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
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
        for module in (triton_pb2, triton_config_pb2)
        for top in module.DESCRIPTOR.message_types_by_name.values()
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
                kind = field.message_type or field.enum_type
                twin_kind = twin.message_type or twin.enum_type
                if kind is not None and twin_kind is not None:
                    assert kind.full_name == twin_kind.full_name, field.full_name
                oneof, twin_oneof = field.containing_oneof, twin.containing_oneof
                assert (oneof and oneof.name) == (twin_oneof and twin_oneof.name), field.full_name
                checked += 1
    assert checked > 110


def test_model_config_messages_and_enums_are_triton_s() -> None:
    for name in (
        "ModelConfig",
        "ModelInput",
        "ModelOutput",
        "ModelDynamicBatching",
        "ModelInstanceGroup",
        "ModelVersionPolicy",
    ):
        assert f"inference.{name}" in {
            m.full_name for m in ours_pb2.DESCRIPTOR.message_types_by_name.values()
        }, name
    enums = [
        (ours_pb2.DESCRIPTOR.enum_types_by_name["DataType"],
         triton_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]),
        (ours_pb2.ModelInput.DESCRIPTOR.enum_types_by_name["Format"],
         triton_config_pb2.ModelInput.DESCRIPTOR.enum_types_by_name["Format"]),
        (ours_pb2.ModelInstanceGroup.DESCRIPTOR.enum_types_by_name["Kind"],
         triton_config_pb2.ModelInstanceGroup.DESCRIPTOR.enum_types_by_name["Kind"]),
    ]  # fmt: skip
    for ours, theirs in enums:
        assert [(v.name, v.number) for v in ours.values] == [
            (v.name, v.number) for v in theirs.values
        ]


def test_a_config_we_send_parses_as_triton_s_with_the_same_values() -> None:
    ours = ours_pb2.ModelConfigResponse()
    config = ours.config
    config.name, config.platform, config.max_batch_size = "m", "onnxruntime_onnx", 8
    config.input.add(name="images", data_type=ours_pb2.TYPE_UINT8, dims=[-1, 224, 224, 3])
    config.output.add(name="probabilities", data_type=ours_pb2.TYPE_FP32, dims=[10])
    config.dynamic_batching.preferred_batch_size.extend([4, 8])
    config.dynamic_batching.max_queue_delay_microseconds = 500
    config.instance_group.add(count=2, kind=ours_pb2.ModelInstanceGroup.KIND_CPU)
    config.version_policy.latest.num_versions = 1
    theirs = triton_pb2.ModelConfigResponse.FromString(ours.SerializeToString())
    assert theirs.config.input[0].data_type == triton_config_pb2.TYPE_UINT8
    assert list(theirs.config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert theirs.config.instance_group[0].count == 2
    assert theirs.config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert theirs.config.version_policy.latest.num_versions == 1


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
