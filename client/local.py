"""``classify(preprocess="client")``: preprocessing and ranking on the caller's side.

The model's own preprocessing comes from its model card (``ModelMetadata``),
cached with the exact version it describes. Results are always ranked with
the labels of the version that answered: after a hot swap the newest version
may have other labels, or another input size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from tlserve.client.results import ImageInput, ModelMetadata
from tlserve.client.wire import model_rows
from tlserve.contract.card import ModelCard
from tlserve.contract.codec import decode_response_outputs
from tlserve.contract.errors import InvalidInput
from tlserve.contract.predictions import Classification, classifications, ood_threshold
from tlserve.contract.rules import INPUT_IMAGES, OUTPUT_OOD_SCORE, OUTPUT_PROBABILITIES
from tlserve.protos import grpc_service_pb2 as pb

__all__ = ["LocalClassifier"]


class Metadata(Protocol):
    """``AsyncClient.model_metadata``."""

    def __call__(
        self, model: str, *, version: str = "", timeout: float | None = None
    ) -> Awaitable[ModelMetadata]: ...


Infer = Callable[
    [str, Mapping[str, np.ndarray], Sequence[str], str, float | None],
    Awaitable[pb.ModelInferResponse],
]


class LocalClassifier:
    """Decode and resize here, send uint8 rows through ``ModelInfer``, rank here."""

    def __init__(self, metadata: Metadata, infer: Infer) -> None:
        self._metadata = metadata
        self._infer = infer
        # (model, version asked for) -> the card and the exact version it describes
        self._cards: dict[tuple[str, str], tuple[ModelCard, str]] = {}

    async def classify(
        self,
        batch: Sequence[ImageInput],
        model: str,
        top_k: int,
        version: str,
        timeout: float | None,
    ) -> list[Classification]:
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        for attempt in (1, 2):
            card, described = await self._card(model, version, remaining())
            rows = await asyncio.to_thread(model_rows, batch, card.preprocessing)
            # A card with an OOD threshold belongs to a model with an ood_score output.
            threshold = ood_threshold(card.metrics)
            wanted = (OUTPUT_PROBABILITIES,) + (() if threshold is None else (OUTPUT_OOD_SCORE,))
            try:
                response = await self._infer(
                    model, {INPUT_IMAGES: rows}, wanted, version, remaining()
                )
            except InvalidInput:
                if version or attempt == 2:
                    raise
                # The newest version may take another input size: fetch its card, once.
                del self._cards[(model, version)]
                continue
            if response.model_version != described:
                # A newer version answered (hot swap): rank with its labels, keep its card.
                card, described = await self._card(model, response.model_version, remaining())
                self._cards[(model, version)] = (card, described)
            outputs = decode_response_outputs(response)
            threshold = ood_threshold(card.metrics)  # of the version that answered
            return classifications(
                outputs[OUTPUT_PROBABILITIES], card.labels, top_k,
                outputs.get(OUTPUT_OOD_SCORE), threshold,
            )  # fmt: skip
        raise AssertionError("unreachable")

    async def _card(self, model: str, version: str, timeout: float | None) -> tuple[ModelCard, str]:
        """The model card of ``model`` at ``version`` (newest if ""), and that exact version."""
        cached = self._cards.get((model, version))
        if cached is None:
            meta = await self._metadata(model, version=version, timeout=timeout)
            if meta.card is None:
                raise InvalidInput(f"{model} has no tlserve model card: use preprocess='server'")
            # The server answers "" with its newest version, the largest number it lists.
            numbered = [v for v in meta.versions if v.isdigit()]
            exact = version or (max(numbered, key=int) if numbered else "")
            cached = self._cards[(model, version)] = (meta.card, exact)
        return cached
