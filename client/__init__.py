"""tlserve's Python client SDK: classify images and run tensors over gRPC.

Light on purpose: grpcio, protobuf, numpy and Pillow; never torch or
onnxruntime.
"""

from __future__ import annotations

from tlserve.client.client import Client, ImageInput, ModelMetadata, Prediction, TensorMetadata
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

__all__ = [
    "Client",
    "DeadlineExceeded",
    "ImageInput",
    "InvalidInput",
    "ModelCard",
    "ModelMetadata",
    "ModelNotFound",
    "Overloaded",
    "Prediction",
    "Preprocessing",
    "ServerError",
    "TensorMetadata",
    "TlserveError",
    "Unauthenticated",
    "Unavailable",
]
