"""ClassifyStream from the client's side: images out, results back, in order."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc

from tlserve.client.results import ImageInput, StreamResult, encode_image
from tlserve.client.wire import async_iter, stream_result
from tlserve.contract.errors import TlserveError, from_rpc_error
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc

__all__ = ["classify_stream"]


async def classify_stream(
    stub: v1_grpc.ImageServiceStub,
    images: Iterable[ImageInput] | AsyncIterable[ImageInput],
    *,
    model: str,
    top_k: int,
    version: str,
    timeout: float | None,
    metadata: Sequence[tuple[str, str]],
) -> AsyncIterator[StreamResult]:
    """One :class:`StreamResult` per image, in order (see ``AsyncClient.classify_stream``)."""
    unsendable: list[TlserveError] = []

    async def requests() -> AsyncIterator[v1.ClassifyRequest]:
        index = 0
        async for image in async_iter(images):
            try:
                encoded = encode_image(image)
            except TlserveError as exc:
                unsendable.append(exc)
                return
            yield v1.ClassifyRequest(
                model_name=model, model_version=version, images=[encoded],
                top_k=top_k, id=str(index),
            )  # fmt: skip
            index += 1

    call = stub.ClassifyStream(requests(), timeout=timeout, metadata=metadata)
    index = 0
    try:
        async for reply in call:
            yield stream_result(index, reply)
            index += 1
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        call.cancel()
    if unsendable:
        raise unsendable[0]
