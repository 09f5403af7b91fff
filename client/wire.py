"""Conversions between the client's Python values and tlserve's messages."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path

import numpy as np

from tlserve.client.results import (
    Classification,
    ImageInput,
    Prediction,
    StreamResult,
    TensorMetadata,
    to_pil,
)
from tlserve.contract.card import Preprocessing
from tlserve.contract.errors import ServerError, from_status_message
from tlserve.contract.images import prepare_decoded, prepare_image
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import tlserve_v1_pb2 as v1


async def async_iter(
    items: Iterable[ImageInput] | AsyncIterable[ImageInput],
) -> AsyncIterator[ImageInput]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def model_row(image: ImageInput, spec: Preprocessing) -> np.ndarray:
    if isinstance(image, bytes | str | Path):
        return prepare_image(image, spec)
    return prepare_decoded(to_pil(image), spec)


def model_rows(images: Sequence[ImageInput], spec: Preprocessing) -> np.ndarray:
    """The model's uint8 input batch ``[N, H, W, 3]`` for ``images``."""
    return np.stack([model_row(image, spec) for image in images])


def predictions(result: v1.Classification) -> Classification:
    """The labels of one image, with its ``ood_score`` (None when the model has none)."""
    return Classification(
        (Prediction(s.label, s.index, s.score) for s in result.labels),
        ood_score=result.ood_score if result.HasField("ood_score") else None,
        out_of_distribution=result.out_of_distribution,
    )


def stream_result(index: int, reply: v1.ClassifyStreamResponse) -> StreamResult:
    if reply.error_message:
        return StreamResult(index, Classification(), from_status_message(reply.error_message))
    results = reply.response.results
    if len(results) != 1:
        failed = ServerError(f"expected 1 result, got {len(results)}")
        return StreamResult(index, Classification(), failed)
    return StreamResult(index, predictions(results[0]))


def tensors(
    items: Sequence[pb.ModelMetadataResponse.TensorMetadata],
) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)
