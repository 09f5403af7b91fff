"""tlserve's Python client SDK: classify images and run tensors over gRPC.

Light on purpose: grpcio, protobuf, numpy and Pillow; never torch or
onnxruntime. :class:`AsyncClient` is the asyncio client; :class:`Client` is
the same client for blocking code.
"""

from __future__ import annotations

from tlserve.client.aio import AsyncClient
from tlserve.client.client import Client
from tlserve.client.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ServerError,
    TlserveError,
    Unauthenticated,
    Unavailable,
)
from tlserve.client.metadata import ModelCard, Preprocessing
from tlserve.client.results import (
    ImageInput,
    ModelMetadata,
    ModelStatus,
    Prediction,
    StreamResult,
    TensorMetadata,
)
from tlserve.client.transport import Credentials, RetryPolicy

__all__ = [
    "AsyncClient",
    "Client",
    "Credentials",
    "DeadlineExceeded",
    "ImageInput",
    "InvalidInput",
    "ModelCard",
    "ModelMetadata",
    "ModelNotFound",
    "ModelStatus",
    "Overloaded",
    "Prediction",
    "Preprocessing",
    "RetryPolicy",
    "ServerError",
    "StreamResult",
    "TensorMetadata",
    "TlserveError",
    "Unauthenticated",
    "Unavailable",
]
