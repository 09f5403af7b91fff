"""The Python client: classify images or run tensors on a tlserve server.

One channel per client, safe to share between threads. ``timeout=`` is the
gRPC deadline of the call; failures raise the typed errors of
:mod:`tlserve.client.errors`, chained ``from`` the ``grpc.RpcError``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

import grpc
import numpy as np
from PIL import Image

from tlserve.client.codec import decode_response_outputs, encode_request_inputs
from tlserve.client.errors import (
    DeadlineExceeded,
    InvalidInput,
    TlserveError,
    Unavailable,
    from_rpc_error,
)
from tlserve.client.metadata import ModelCard
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc

__all__ = ["Client", "ImageInput", "ModelMetadata", "Prediction", "TensorMetadata"]

#: An image to classify: a file path, encoded bytes, a PIL image or an
#: ``[H, W, 3]`` (or ``[H, W]``) uint8 array.
ImageInput: TypeAlias = str | Path | bytes | Image.Image | np.ndarray

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Prediction:
    """One label of a classification, best first."""

    label: str
    index: int
    score: float


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A served model: its tensors, provider and (if it has one) model card."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    execution_provider: str
    card: ModelCard | None


def encode_image(image: ImageInput) -> bytes:
    """Encoded bytes for any accepted image form (arrays and PIL as PNG)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.shape[2:] not in ((), (3,), (4,)) or image.ndim < 2:
            raise InvalidInput(
                "an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                f"got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidInput(f"cannot send {type(image).__name__} as an image")


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


def _tensors(
    items: Sequence[pb.ModelMetadataResponse.TensorMetadata],
) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)


class Client:
    """A connection to one tlserve server (``host:port``).

    Use as a context manager, or call :meth:`close`::

        with Client("localhost:8001") as client:
            client.wait_until_ready(timeout=30)
            [labels] = client.classify(["cat.jpg"], model="pets")
    """

    def __init__(self, target: str, *, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                *options,
            ],
        )
        self._inference = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._images = v1_grpc.ImageServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        top_k: int = 5,
        version: str = "",
        timeout: float | None = None,
    ) -> list[list[Prediction]]:
        """Classify one image or many; one list of predictions per image, in order.

        The server decodes and resizes each image with the model's own
        preprocessing, so send the original files.
        """
        batch: list[ImageInput] = (
            [images]  # type: ignore[list-item]
            if _is_single_image(images)
            else list(images)  # type: ignore[arg-type]
        )
        request = v1.ClassifyRequest(
            model_name=model,
            model_version=version,
            images=[encode_image(image) for image in batch],
            top_k=top_k,
        )
        with _mapped_errors():
            response = self._images.Classify(request, timeout=timeout)
        return [
            [Prediction(s.label, s.index, s.score) for s in result.labels]
            for result in response.results
        ]

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on named arrays (sent as raw contents); named arrays back."""
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        encode_request_inputs(request, dict(inputs))
        for name in outputs:
            request.outputs.add(name=name)
        with _mapped_errors():
            response = self._inference.ModelInfer(request, timeout=timeout)
        return decode_response_outputs(response)

    def model_metadata(
        self, model: str, *, version: str = "", timeout: float | None = None
    ) -> ModelMetadata:
        """The model's tensors, execution provider and model card."""
        with _mapped_errors():
            response = self._inference.ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version), timeout=timeout
            )
        params = {k: v.string_param for k, v in response.parameters.items()}
        return ModelMetadata(
            name=response.name,
            versions=tuple(response.versions),
            platform=response.platform,
            inputs=_tensors(response.inputs),
            outputs=_tensors(response.outputs),
            execution_provider=params.get("execution_provider", ""),
            card=ModelCard.from_props(params),
        )

    def server_ready(self, *, timeout: float | None = None) -> bool:
        """True when every model is loaded and warm and the server is not draining."""
        with _mapped_errors():
            return bool(self._inference.ServerReady(pb.ServerReadyRequest(), timeout=timeout).ready)

    def wait_until_ready(self, *, timeout: float = 60.0, interval: float = 0.2) -> None:
        """Block until the server is ready; DeadlineExceeded after ``timeout`` seconds."""
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
                if self.server_ready(timeout=min(remaining, 5.0)):
                    return
            except (Unavailable, DeadlineExceeded) as exc:
                last = exc
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))


def _is_single_image(images: object) -> bool:
    return isinstance(images, str | Path | bytes | Image.Image | np.ndarray)
