"""The data plane: inference, classification and embeddings, without any gRPC.

Servicers decode protos, call this, and encode the reply; everything a test
would want to call directly lives here. Every request holds the model
version it resolved for its whole life (``registry.acquire``), so a hot swap
or an unload waits for it instead of failing it, and a Classify never mixes
one version's labels with another's outputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from tlserve.contract.card import Preprocessing
from tlserve.contract.codec import datatype_of
from tlserve.contract.errors import InvalidInput, TlserveError
from tlserve.contract.predictions import (
    DEFAULT_TOP_K,
    Classification,
    classifications,
    ood_threshold,
)
from tlserve.contract.rules import OUTPUT_EMBEDDINGS, OUTPUT_OOD_SCORE, OUTPUT_PROBABILITIES
from tlserve.server.core.decode import ImageDecoder, ImageHeader
from tlserve.server.metrics import ServerMetrics
from tlserve.server.models.lifecycle import ModelRegistry
from tlserve.server.models.repository import LoadedModel
from tlserve.server.models.runtime import OnnxModel

__all__ = ["InferenceCore", "validate_inputs"]


Arrays = dict[str, np.ndarray]


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
        self.max_images = registry.config.max_images_per_request
        self.decoder = ImageDecoder(
            max_pixels=registry.config.max_image_pixels,
            max_request_pixels=registry.config.max_request_pixels,
        )
        self._draining = False

    @property
    def ready(self) -> bool:
        """Every model loaded and not draining: what health and ServerReady report."""
        return self.registry.ready and not self._draining

    def drain(self) -> None:
        """Report not-ready from now on (requests are still answered until the server stops)."""
        self._draining = True

    def metric_label(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one value."""
        return name if self.registry.has(name) else "unknown"

    async def infer(
        self, name: str, version: str, inputs: Arrays, *, deadline: float | None = None
    ) -> tuple[LoadedModel, Arrays]:
        """Run the model on the inputs through its batcher."""
        with self.registry.acquire(name, version) as loaded:
            return loaded, await self._run(loaded, inputs, deadline, validate=True)

    async def classify(
        self,
        name: str,
        version: str,
        images: Sequence[bytes],
        *,
        top_k: int = DEFAULT_TOP_K,
        deadline: float | None = None,
    ) -> tuple[LoadedModel, list[Classification]]:
        """Decode and resize the images as the model was trained, then classify.

        A model with an ``ood_score`` output also says how unlike its training
        data each image is, flagged against its card's threshold.
        """
        with self.registry.acquire(name, version) as loaded:
            outputs = await self._images_to(loaded, images, OUTPUT_PROBABILITIES, deadline)
            card = loaded.model.card
            labels = card.labels if card else ()
            threshold = ood_threshold(card.metrics) if card else None
            scores = outputs.get(OUTPUT_OOD_SCORE)
            results = classifications(
                outputs[OUTPUT_PROBABILITIES], labels, top_k, scores, threshold
            )
            if scores is not None and threshold:
                self._count_ood(loaded, results, threshold)
            return loaded, results

    def _count_ood(
        self, loaded: LoadedModel, results: list[Classification], threshold: float
    ) -> None:
        histogram = self.metrics.ood_score.labels(loaded.name)
        for result in results:
            histogram.observe((result.ood_score or 0.0) / threshold)
        flagged = sum(r.out_of_distribution for r in results)
        self.metrics.ood_flagged.labels(loaded.name, loaded.version).inc(flagged)

    async def embed(
        self, name: str, version: str, images: Sequence[bytes], *, deadline: float | None = None
    ) -> tuple[LoadedModel, np.ndarray]:
        """Decode and resize the images, then return the model's ``embeddings`` rows."""
        with self.registry.acquire(name, version) as loaded:
            outputs = await self._images_to(loaded, images, OUTPUT_EMBEDDINGS, deadline)
            return loaded, outputs[OUTPUT_EMBEDDINGS]

    async def _images_to(
        self, loaded: LoadedModel, images: Sequence[bytes], output: str, deadline: float | None
    ) -> Arrays:
        """Every output of the model on ``images`` (which must include ``output``)."""
        card = loaded.model.card
        if card is None:
            raise InvalidInput(
                f"model {loaded.name!r} carries no tlserve model card (labels, preprocessing); "
                "call ModelInfer with tensors instead"
            )
        if output not in {spec.name for spec in loaded.model.outputs}:
            raise InvalidInput(f"model {loaded.name!r} has no {output!r} output")
        if not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.max_images:
            raise InvalidInput(
                f"{len(images)} images in one request; the limit is {self.max_images}"
            )
        started = time.perf_counter()
        batch = await self._prepare(images, card.preprocessing)
        self.metrics.preprocess_duration.labels(loaded.name).observe(time.perf_counter() - started)
        feeds = {loaded.model.inputs[0].name: batch}
        return await self._run(loaded, feeds, deadline, validate=False)

    async def _run(
        self, loaded: LoadedModel, inputs: Arrays, deadline: float | None, *, validate: bool
    ) -> Arrays:
        """Submit to the batcher; count the outcome in statistics and metrics."""
        started = time.perf_counter_ns()
        ok = False
        try:
            with self.metrics.inference(loaded.name, loaded.version, deadline):
                if validate:
                    validate_inputs(loaded.name, loaded.model, inputs)
                outputs = await loaded.batcher.submit(inputs, deadline=deadline)
            ok = True
            return outputs
        finally:
            loaded.stats.record_request(time.perf_counter_ns() - started, ok=ok)

    async def _prepare(self, images: Sequence[bytes], spec: Preprocessing) -> np.ndarray:
        loop = asyncio.get_running_loop()
        # Every header first: a request over its pixel budget, or with one
        # refused image, costs no decoding at all.
        headers = await loop.run_in_executor(self._preprocess, self.decoder.read_headers, images)
        rows = await asyncio.gather(
            *(loop.run_in_executor(self._preprocess, self._prepare_one, i, data, header, spec)
              for i, (data, header) in enumerate(zip(images, headers, strict=True))),
        )  # fmt: skip
        return np.stack(rows)

    def statistics(self, name: str, version: str) -> list[LoadedModel]:
        """The serving versions whose statistics are asked for (every one if no name)."""
        if not name:
            return [m for n in self.registry.names() for m in self.registry.versions(n)]
        if version:
            return [self.registry.get(name, version)]
        self.registry.get(name)  # ModelNotFound if unknown
        return self.registry.versions(name)

    def _prepare_one(
        self, index: int, data: bytes, header: ImageHeader, spec: Preprocessing
    ) -> np.ndarray:
        """Decode one image (in a preprocess thread); errors name the image's index."""
        try:
            row, path = self.decoder.prepare(data, spec, header)
        except TlserveError as exc:
            raise type(exc)(f"image {index}: {exc}") from exc
        self.metrics.images_decoded.labels(path).inc()
        return row
