"""The asyncio client: every call is written here once.

:class:`tlserve.client.Client` runs this same client on a private event loop,
so the sync and async APIs cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import numpy as np

from tlserve.client.local import LocalClassifier
from tlserve.client.results import (
    ImageInput,
    ModelMetadata,
    ModelStatus,
    StreamResult,
    encode_image,
    image_batch,
)
from tlserve.client.streaming import classify_stream
from tlserve.client.transport import (
    DEFAULT_TIMEOUT,
    Credentials,
    OutstandingCalls,
    RetryPolicy,
    call_with_retries,
    channel_options,
    open_channel,
)
from tlserve.client.wire import predictions, tensors
from tlserve.contract.card import ModelCard
from tlserve.contract.codec import decode_response_outputs, encode_request_inputs
from tlserve.contract.errors import (
    DeadlineExceeded,
    ModelNotFound,
    TlserveError,
    Unavailable,
)
from tlserve.contract.predictions import DEFAULT_TOP_K, Classification
from tlserve.contract.rules import MAX_MESSAGE_BYTES
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import health_pb2, health_pb2_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc

__all__ = ["AsyncClient"]

_NO_RETRY = RetryPolicy(max_attempts=1)


class AsyncClient:
    """An asyncio connection to one tlserve server (``host:port``).

    Create it inside the event loop that uses it; one channel, shared by all
    the tasks of that loop::

        async with AsyncClient("localhost:8001") as client:
            await client.wait_until_ready(timeout=30)
            [labels] = await client.classify("cat.jpg", model="pets")

    ``timeout`` is the default deadline of each call, in seconds (30;
    ``None``: no deadline, a call may then wait as long as the server
    does); ``retry`` says how ``Overloaded``/``Unavailable`` calls are
    retried within that deadline; ``credentials`` adds TLS, mTLS and a token.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._credentials = credentials or Credentials()
        self._metadata = self._credentials.metadata()
        self._channel = open_channel(
            target, self._credentials, channel_options(max_message_bytes, options)
        )
        self._inference = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._images = v1_grpc.ImageServiceStub(self._channel)
        # grpc.health.v1 compiled into tlserve.protos: the bare install has no grpc_health.
        self._health = health_pb2_grpc.HealthStub(self._channel).Check
        self._local = LocalClassifier(self.model_metadata, self._model_infer)
        self._closed = False
        self._out = OutstandingCalls()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls made afterwards raise ``ValueError``."""
        self._closed = True
        await self._channel.close()

    async def _unary(
        self, method: Any, request: Any, timeout: float | None, *, retry: bool = True
    ) -> Any:
        if self._closed:
            raise ValueError(f"the client for {self.target} is closed")

        async def attempt(remaining: float | None) -> Any:
            return await self._out.run(method(request, timeout=remaining, metadata=self._metadata))

        return await call_with_retries(
            attempt,
            timeout=self.timeout if timeout is None else timeout,
            policy=self.retry if retry else _NO_RETRY,
        )

    async def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        model: str,
        top_k: int = DEFAULT_TOP_K,
        version: str = "",
        timeout: float | None = None,
        preprocess: Literal["server", "client"] = "server",
    ) -> list[Classification]:
        """Classify one image or many; one :class:`Classification` per image, in order.

        Each: the top-k predictions, best first, with ``ood_score`` and
        ``out_of_distribution`` (when the model carries the score).

        ``preprocess="server"`` sends the encoded images (Classify).
        ``"client"`` decodes and resizes them here with the model's own
        preprocessing (from its model card, fetched once and cached), sends
        uint8 rows (ModelInfer) and ranks the probabilities here: the same
        labels, and scores within 1e-5 of the server's.
        """
        batch = image_batch(images)
        if preprocess == "client":
            return await self._local.classify(
                batch, model, top_k, version,
                self.timeout if timeout is None else timeout,
            )  # fmt: skip
        if preprocess != "server":
            raise ValueError(f"preprocess must be 'server' or 'client', got {preprocess!r}")
        request = v1.ClassifyRequest(
            model_name=model,
            model_version=version,
            images=[encode_image(image) for image in batch],
            top_k=top_k,
        )
        response = await self._unary(self._images.Classify, request, timeout)
        return [predictions(result) for result in response.results]

    async def embed(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        model: str,
        version: str = "",
        timeout: float | None = None,
    ) -> np.ndarray:
        """The backbone's pooled features of each image: float32 ``[N, D]``."""
        request = v1.EmbedRequest(
            model_name=model,
            model_version=version,
            images=[encode_image(image) for image in image_batch(images)],
        )
        response = await self._unary(self._images.Embed, request, timeout)
        return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on named arrays (sent as raw contents); named arrays back."""
        response = await self._model_infer(model, inputs, outputs, version, timeout)
        return decode_response_outputs(response)

    async def _model_infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        version: str,
        timeout: float | None,
    ) -> pb.ModelInferResponse:
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        encode_request_inputs(request, dict(inputs))
        request.outputs.extend(
            pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs
        )
        return await self._unary(self._inference.ModelInfer, request, timeout)  # type: ignore[no-any-return]

    async def classify_stream(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        model: str,
        top_k: int = DEFAULT_TOP_K,
        version: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Classify a flow of images over one stream; one :class:`StreamResult` each, in order.

        A server-side failure of one image is that result's ``error``; the
        stream goes on. An image that cannot be sent ends the stream after
        the answers already due, then raises. ``timeout`` bounds the whole
        stream (the client's default deadline does not: a stream may run for
        hours). Not retried.
        """
        if self._closed:
            raise ValueError(f"the client for {self.target} is closed")
        results = classify_stream(
            self._images, images, model=model, top_k=top_k, version=version,
            timeout=timeout, metadata=self._metadata,
        )  # fmt: skip
        async for result in results:
            yield result

    async def model_metadata(
        self, model: str, *, version: str = "", timeout: float | None = None
    ) -> ModelMetadata:
        """The model's tensors, execution provider and model card."""
        request = pb.ModelMetadataRequest(name=model, version=version)
        response = await self._unary(self._inference.ModelMetadata, request, timeout)
        params = {k: v.string_param for k, v in response.parameters.items()}
        return ModelMetadata(
            name=response.name,
            versions=tuple(response.versions),
            platform=response.platform,
            inputs=tensors(response.inputs),
            outputs=tensors(response.outputs),
            execution_provider=params.get("execution_provider", ""),
            card=ModelCard.from_props(params),
        )

    async def list_models(
        self, *, ready_only: bool = False, timeout: float | None = None
    ) -> list[ModelStatus]:
        """Every model version in the server's repository, with its state."""
        request = pb.RepositoryIndexRequest(ready=ready_only)
        response = await self._unary(self._inference.RepositoryIndex, request, timeout)
        return [ModelStatus(m.name, m.version, m.state, m.reason) for m in response.models]

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        """True when every model is loaded and warm and the server is not draining."""
        request = pb.ServerReadyRequest()
        return bool(
            (await self._unary(self._inference.ServerReady, request, timeout, retry=False)).ready
        )

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status Kubernetes sees: SERVING, NOT_SERVING, SERVICE_UNKNOWN."""
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            response = await self._unary(self._health, request, timeout, retry=False)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except ModelNotFound:
            return "SERVICE_UNKNOWN"

    async def wait_until_ready(self, *, timeout: float = 60.0, interval: float = 0.2) -> None:
        """Wait until the server is ready; ``DeadlineExceeded`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: TlserveError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"{self.target} not ready after {timeout:.1f}s"
                    + (f" (last error: {last})" if last else "")
                ) from last
            try:
                if await self.server_ready(timeout=min(remaining, 5.0)):
                    return
            except (Unavailable, DeadlineExceeded) as exc:
                last = exc
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))
