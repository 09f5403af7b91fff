"""gRPC servicers: decode the proto, call the core, encode the reply.

Domain errors become status codes in one place, :func:`_handled`; anything
unexpected is logged and becomes INTERNAL with no internals leaked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import grpc

from tlserve.client.codec import decode_request_inputs, encode_response_outputs
from tlserve.client.errors import InvalidInput, TlserveError
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc
from tlserve.server.core import InferenceCore

__all__ = ["ImageServicer", "InferenceServicer", "server_version"]

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Servicer = TypeVar("Servicer", "InferenceServicer", "ImageServicer")
Handler = Callable[[Servicer, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def server_version() -> str:
    try:
        return version("tlserve")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _handled(
    api: str | None = None,
) -> Callable[[Handler[Servicer, Req, Resp]], Handler[Servicer, Req, Resp]]:
    """Map domain errors to status codes; with ``api``, count and time the call."""

    def wrap(method: Handler[Servicer, Req, Resp]) -> Handler[Servicer, Req, Resp]:
        @functools.wraps(method)
        async def handler(
            self: Servicer, request: Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Resp:
            started = time.perf_counter()
            outcome = "OK"
            try:
                return await method(self, request, context)
            except TlserveError as exc:
                outcome = exc.code.name
                await context.abort(exc.code, str(exc))
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            except Exception:
                outcome = "INTERNAL"
                log.exception("%s failed", api or method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see server logs")
            finally:
                if api is not None:
                    model = self.core.metric_label(getattr(request, "model_name", ""))
                    self.core.metrics.requests.labels(model, api, outcome).inc()
                    self.core.metrics.request_duration.labels(model, api).observe(
                        time.perf_counter() - started
                    )
            raise AssertionError("unreachable: context.abort raises")

        return handler

    return wrap


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


def _param(value: str) -> pb.InferParameter:
    return pb.InferParameter(string_param=value)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol (KServe v2) over gRPC."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    @_handled()
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_handled()
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    @_handled()
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        try:
            self.core.registry.get(request.name, request.version)
        except TlserveError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.core.draining)

    @_handled()
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        providers = sorted(
            {self.core.registry.get(n).model.provider for n in self.core.registry.names()}
        )
        return pb.ServerMetadataResponse(
            name="tlserve",
            version=server_version(),
            extensions=[],
            parameters={"execution_providers": _param(",".join(providers))},
        )

    @_handled()
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        loaded = self.core.registry.get(request.name, request.version)
        model = loaded.model
        params = {"execution_provider": _param(model.provider)}
        if model.card is not None:
            params.update({k: _param(v) for k, v in model.card.to_props().items()})
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=[loaded.version],
            platform="onnxruntime_onnx",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=s.shape
                )
                for s in model.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=s.shape
                )
                for s in model.outputs
            ],
            parameters=params,
        )

    @_handled("ModelInfer")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        inputs = decode_request_inputs(request)
        loaded, outputs = await self.core.infer(
            request.model_name, request.model_version, inputs, deadline=_deadline(context)
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


class ImageServicer(v1_grpc.ImageServiceServicer):
    """tlserve.v1: encoded images in, labels out."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    @_handled("Classify")
    async def Classify(self, request: v1.ClassifyRequest, context: Any) -> v1.ClassifyResponse:
        loaded, results = await self.core.classify(
            request.model_name,
            request.model_version,
            list(request.images),
            top_k=request.top_k,
            deadline=_deadline(context),
        )
        return v1.ClassifyResponse(
            model_name=loaded.name,
            model_version=loaded.version,
            results=[
                v1.Classification(
                    labels=[
                        v1.ScoredLabel(label=s.label, index=s.index, score=s.score) for s in row
                    ]
                )
                for row in results
            ],
        )
