"""The data plane: inference and classification, without any gRPC.

Servicers decode protos, call this, and encode the reply; everything a test
would want to call directly lives here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from tlserve.client.codec import datatype_of
from tlserve.client.errors import InvalidInput, TlserveError
from tlserve.client.metadata import Preprocessing
from tlserve.client.preprocess import prepare_image
from tlserve.server.metrics import ServerMetrics
from tlserve.server.repository import LoadedModel, ModelRegistry
from tlserve.server.runtime import OnnxModel

__all__ = ["DEFAULT_TOP_K", "MAX_IMAGES_PER_REQUEST", "InferenceCore", "ScoredLabel"]

DEFAULT_TOP_K = 5
MAX_IMAGES_PER_REQUEST = 256

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ScoredLabel:
    label: str
    index: int
    score: float


def validate_inputs(name: str, model: OnnxModel, inputs: Arrays) -> None:
    """Check names, datatypes and shapes against the model; InvalidInput if off."""
    expected = {spec.name: spec for spec in model.inputs}
    missing = sorted(set(expected) - set(inputs))
    unexpected = sorted(set(inputs) - set(expected))
    if missing or unexpected:
        raise InvalidInput(
            f"model {name!r} takes inputs {sorted(expected)}; "
            f"missing {missing}, unexpected {unexpected}"
        )
    rows = set()
    for spec in model.inputs:
        array = inputs[spec.name]
        datatype = datatype_of(array.dtype)
        if datatype != spec.datatype:
            raise InvalidInput(
                f"input {spec.name!r} is {datatype} but model {name!r} takes {spec.datatype}"
            )
        shape_ok = len(array.shape) == len(spec.shape) and all(
            want in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        )
        if not shape_ok:
            raise InvalidInput(
                f"input {spec.name!r} has shape {list(array.shape)} but model {name!r} takes "
                f"{list(spec.shape)} (-1: any size)"
            )
        if model.batchable:
            rows.add(array.shape[0])
    if 0 in rows:
        raise InvalidInput("inputs have a batch of 0 rows; send at least one")
    if len(rows) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(rows)}")


class InferenceCore:
    """What the server does, callable from tests without a gRPC server."""

    def __init__(
        self, registry: ModelRegistry, metrics: ServerMetrics, preprocess_executor: Executor
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._preprocess = preprocess_executor
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.registry.ready and not self.draining

    def metric_label(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one value."""
        return name if self.registry.has(name) else "unknown"

    async def infer(
        self, name: str, version: str, inputs: Arrays, *, deadline: float | None = None
    ) -> tuple[LoadedModel, Arrays]:
        """Run the model on the inputs through its batcher."""
        loaded = self.registry.get(name, version)
        validate_inputs(name, loaded.model, inputs)
        return loaded, await loaded.batcher.submit(inputs, deadline=deadline)

    async def classify(
        self,
        name: str,
        version: str,
        images: Sequence[bytes],
        *,
        top_k: int = DEFAULT_TOP_K,
        deadline: float | None = None,
    ) -> tuple[LoadedModel, list[list[ScoredLabel]]]:
        """Decode and resize the images as the model was trained, then classify."""
        loaded = self.registry.get(name, version)
        card = loaded.model.card
        if card is None:
            raise InvalidInput(
                f"model {name!r} carries no tlserve model card (labels, preprocessing); "
                "call ModelInfer with tensors instead"
            )
        if not images:
            raise InvalidInput("no images in the request")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise InvalidInput(
                f"{len(images)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}"
            )
        started = time.perf_counter()
        batch = await self._prepare(images, card.preprocessing)
        self.metrics.preprocess_duration.labels(name).observe(time.perf_counter() - started)
        input_name = loaded.model.inputs[0].name
        _, outputs = await self.infer(name, version, {input_name: batch}, deadline=deadline)
        probabilities = outputs.get("probabilities")
        if probabilities is None:
            raise InvalidInput(f"model {name!r} has no 'probabilities' output to classify with")
        k = max(1, min(top_k or DEFAULT_TOP_K, probabilities.shape[1]))
        return loaded, [_top_k(row, card.labels, k) for row in probabilities]

    async def _prepare(self, images: Sequence[bytes], spec: Preprocessing) -> np.ndarray:
        loop = asyncio.get_running_loop()
        rows = await asyncio.gather(
            *(loop.run_in_executor(self._preprocess, _prepare_one, i, data, spec)
              for i, data in enumerate(images)),
        )  # fmt: skip
        return np.stack(rows)


def _prepare_one(index: int, data: bytes, spec: Preprocessing) -> np.ndarray:
    try:
        return prepare_image(data, spec)
    except TlserveError as exc:
        raise type(exc)(f"image {index}: {exc}") from exc


def _top_k(row: np.ndarray, labels: Sequence[str], k: int) -> list[ScoredLabel]:
    best = np.argsort(-row, kind="stable")[:k]
    return [ScoredLabel(labels[i], int(i), float(row[i])) for i in best]
