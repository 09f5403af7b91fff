"""tlserve's Python client SDK: classify images and run tensors over gRPC.

Light on purpose: grpcio, protobuf, numpy and Pillow; never torch or
onnxruntime. :class:`AsyncClient` is the asyncio client; :class:`Client` is
the same client for blocking code. Errors, the model card and predictions
are the shared contract's (:mod:`tlserve.contract`), re-exported here.
"""

from __future__ import annotations

from tlserve.client.aio import AsyncClient
from tlserve.client.client import Client
from tlserve.client.results import (
    ImageInput,
    ModelMetadata,
    ModelStatus,
    Prediction,
    StreamResult,
    TensorMetadata,
)
from tlserve.client.transport import Credentials, RetryPolicy
from tlserve.contract.card import ModelCard, Preprocessing
from tlserve.contract.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    NotAllowed,
    Overloaded,
    ServerError,
    TlserveError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from tlserve.contract.predictions import Classification

__all__ = [
    "AsyncClient",
    "Classification",
    "Client",
    "Credentials",
    "DeadlineExceeded",
    "ImageInput",
    "InvalidInput",
    "ModelCard",
    "ModelMetadata",
    "ModelNotFound",
    "ModelStatus",
    "NotAllowed",
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
    "Unimplemented",
]
