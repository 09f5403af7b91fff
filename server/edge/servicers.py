"""gRPC servicers: decode the proto, call the core, encode the reply.

Status codes, counting and the retry hint are :mod:`tlserve.server.edge.handling`'s
(one place); stream messages are answered in order by
:mod:`tlserve.server.edge.streams`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tlserve.contract.codec import decode_request_inputs, encode_response_outputs
from tlserve.contract.errors import InvalidInput
from tlserve.contract.predictions import Classification
from tlserve.contract.rules import tlserve_version
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc
from tlserve.server.core.control import ModelControl
from tlserve.server.core.describe import EXTENSIONS, index_entries, model_statistics
from tlserve.server.core.inference import InferenceCore
from tlserve.server.edge.handling import counted, deadline_of, handled
from tlserve.server.edge.streams import answer_in_order
from tlserve.server.models.repository import LoadedModel

__all__ = ["ImageServicer", "InferenceServicer"]


def _param(value: str) -> pb.InferParameter:
    return pb.InferParameter(string_param=value)


def _tensors(specs: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


def _check_repository_request(request: Any) -> None:
    # unload_dependents: tritonclient always sends it; tlserve has no ensembles,
    # so a model has no dependents. Config or file overrides are not supported.
    unsupported = sorted(set(request.parameters) - {"unload_dependents"})
    if unsupported:
        raise InvalidInput(
            f"load/unload parameters {unsupported} are not supported: tlserve "
            "loads model versions from the repository as they are on disk"
        )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol (KServe v2) over gRPC, with Triton's extensions."""

    def __init__(self, core: InferenceCore, control: ModelControl) -> None:
        self.core = core
        self.control = control

    @handled()
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @handled()
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    @handled()
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.control.model_ready(request.name, request.version))

    @handled()
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="tlserve",
            version=tlserve_version(),
            extensions=EXTENSIONS,
            parameters={"execution_providers": _param(",".join(self.control.providers()))},
        )

    @handled()
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        described = self.control.describe(request.name, request.version)
        model = described.loaded.model
        params = {"execution_provider": _param(model.provider)}
        if model.card is not None:
            params.update({k: _param(v) for k, v in model.card.to_props().items()})
        return pb.ModelMetadataResponse(
            name=described.loaded.name,
            versions=described.versions,
            platform="onnxruntime_onnx",
            inputs=_tensors(model.inputs),
            outputs=_tensors(model.outputs),
            parameters=params,
        )

    @handled()
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.control.config(request.name, request.version))

    @handled()
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        versions = self.core.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in versions])

    @handled()
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        rows = await self.control.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=index_entries(rows))

    @handled()
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository_request(request)
        await self.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @handled()
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_request(request)
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @handled("ModelInfer")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        inputs = decode_request_inputs(request)
        loaded, outputs = await self.core.infer(
            request.model_name, request.model_version, inputs, deadline=deadline
        )
        if request.outputs:
            wanted = [o.name for o in request.outputs]
            unknown = sorted(set(wanted) - set(outputs))
            if unknown:
                raise InvalidInput(
                    f"model {loaded.name!r} has no outputs {unknown}; it has {sorted(outputs)}"
                )
            outputs = {name: outputs[name] for name in wanted}
        response = pb.ModelInferResponse(
            model_name=loaded.name, model_version=loaded.version, id=request.id
        )
        encode_response_outputs(response, outputs)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            work = self._infer(request, deadline)
            answer = await counted(
                self.core, "ModelStreamInfer", request.model_name, work, deadline
            )
            return pb.ModelStreamInferResponse(infer_response=answer)

        def failed(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
            )

        async for response in answer_in_order(request_iterator, handle, failed):
            yield response


def _classify_response(
    loaded: LoadedModel, results: list[Classification], request_id: str
) -> v1.ClassifyResponse:
    return v1.ClassifyResponse(
        model_name=loaded.name,
        model_version=loaded.version,
        id=request_id,
        results=[
            v1.Classification(
                labels=[v1.ScoredLabel(label=s.label, index=s.index, score=s.score) for s in row],
                ood_score=row.ood_score,  # None (absent) for a model without the output
                out_of_distribution=row.out_of_distribution,
            )
            for row in results
        ],
    )


class ImageServicer(v1_grpc.ImageServiceServicer):
    """tlserve.v1: encoded images in, labels or embeddings out."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    @handled("Classify")
    async def Classify(self, request: v1.ClassifyRequest, context: Any) -> v1.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    async def _classify(
        self, request: v1.ClassifyRequest, deadline: float | None
    ) -> v1.ClassifyResponse:
        loaded, results = await self.core.classify(
            request.model_name,
            request.model_version,
            list(request.images),
            top_k=request.top_k,
            deadline=deadline,
        )
        return _classify_response(loaded, results, request.id)

    @handled("Embed")
    async def Embed(self, request: v1.EmbedRequest, context: Any) -> v1.EmbedResponse:
        loaded, rows = await self.core.embed(
            request.model_name,
            request.model_version,
            list(request.images),
            deadline=deadline_of(context),
        )
        return v1.EmbedResponse(
            model_name=loaded.name,
            model_version=loaded.version,
            embeddings=[v1.Embedding(values=row.tolist()) for row in rows.reshape(len(rows), -1)],
        )

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[v1.ClassifyRequest], context: Any
    ) -> AsyncIterator[v1.ClassifyStreamResponse]:
        deadline = deadline_of(context)

        async def handle(request: v1.ClassifyRequest) -> v1.ClassifyStreamResponse:
            work = self._classify(request, deadline)
            answer = await counted(self.core, "ClassifyStream", request.model_name, work, deadline)
            return v1.ClassifyStreamResponse(response=answer)

        def failed(request: v1.ClassifyRequest, message: str) -> v1.ClassifyStreamResponse:
            return v1.ClassifyStreamResponse(
                error_message=message,
                response=v1.ClassifyResponse(model_name=request.model_name, id=request.id),
            )

        async for response in answer_in_order(request_iterator, handle, failed):
            yield response
