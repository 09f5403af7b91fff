"""Loaded models and their statistics, as Triton's extension messages.

Pure functions from the registry's objects to protos: the servicers call
them and tests can too.
"""

from __future__ import annotations

from tlserve.contract.rules import GPU_PROVIDERS, MODEL_FILE
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.server.batching.statistics import Duration, ModelStatistics
from tlserve.server.config import ServerConfig
from tlserve.server.models.lifecycle import VersionState
from tlserve.server.models.repository import LoadedModel
from tlserve.server.models.runtime import TensorSpec

__all__ = ["EXTENSIONS", "index_entries", "model_config", "model_statistics"]

# Triton's names for the protocol extensions tlserve implements.
EXTENSIONS = (
    "model_repository",
    "statistics",
    "model_configuration",
)


def _dims(spec: TensorSpec, batchable: bool) -> list[int]:
    # Triton's convention: no batch dimension in dims when max_batch_size > 0.
    return list(spec.shape[1:] if batchable else spec.shape)


def _data_type(datatype: str) -> int:
    return pb.DataType.Value("TYPE_" + datatype)


def model_config(loaded: LoadedModel, config: ServerConfig) -> pb.ModelConfig:
    """What Triton's ``ModelConfig`` would say about this version as tlserve serves it."""
    model, batcher = loaded.model, loaded.batcher
    batchable = model.batchable
    result = pb.ModelConfig(
        name=loaded.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=batcher.max_batch_size if batchable else 0,
        default_model_filename=MODEL_FILE,
    )
    for spec in model.inputs:
        fmt = pb.ModelInput.FORMAT_NONE
        if model.card is not None and spec is model.inputs[0]:
            fmt = pb.ModelInput.FORMAT_NHWC  # the tlserve artifact: uint8 NHWC images
        result.input.add(
            name=spec.name,
            data_type=_data_type(spec.datatype),
            format=fmt,
            dims=_dims(spec, batchable),
        )
    for spec in model.outputs:
        result.output.add(
            name=spec.name, data_type=_data_type(spec.datatype), dims=_dims(spec, batchable)
        )
    if batchable:
        result.dynamic_batching.preferred_batch_size.extend(config.preferred_batch_sizes)
        result.dynamic_batching.max_queue_delay_microseconds = round(batcher.max_queue_delay * 1e6)
    on_gpu = model.provider in GPU_PROVIDERS
    result.instance_group.add(
        name=f"{loaded.name}_0",
        count=batcher.instances,
        kind=pb.ModelInstanceGroup.KIND_GPU if on_gpu else pb.ModelInstanceGroup.KIND_CPU,
        gpus=[0] if on_gpu else [],
    )
    _parameters(result, loaded)
    policy = config.version_policy
    if policy.kind == "latest":
        result.version_policy.latest.num_versions = policy.latest
    elif policy.kind == "specific":
        result.version_policy.specific.versions.extend(policy.specific)
    else:
        result.version_policy.all.SetInParent()
    return result


def _parameters(result: pb.ModelConfig, loaded: LoadedModel) -> None:
    """The settings this version serves with, where each came from, and its variant."""
    tuning = loaded.tuning
    if tuning is not None:
        for setting, value in tuning.settings().items():
            result.parameters[setting].string_value = str(value)
            result.parameters[f"{setting}_source"].string_value = tuning.sources.get(
                setting, "default"
            )
        if tuning.lone_threads:
            result.parameters["lone_batch_threads"].string_value = str(tuning.lone_threads)
        if tuning.reason:
            result.parameters["tuning"].string_value = tuning.reason
    variant = loaded.variant
    if variant is not None:
        result.parameters["variant"].string_value = variant.variant
        result.parameters["variant_source"].string_value = variant.source
        result.parameters["variant_reason"].string_value = variant.reason
        result.parameters["host_cpu"].string_value = variant.host


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(loaded: LoadedModel) -> pb.ModelStatistics:
    """One version's counts and durations since it was loaded."""
    s: ModelStatistics = loaded.stats
    return pb.ModelStatistics(
        name=loaded.name,
        version=loaded.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )


def index_entries(
    rows: list[VersionState],
) -> list[pb.RepositoryIndexResponse.ModelIndex]:
    """The repository index, one entry per model version."""
    return [
        pb.RepositoryIndexResponse.ModelIndex(
            name=row.name, version=row.version, state=row.state, reason=row.reason
        )
        for row in rows
    ]
