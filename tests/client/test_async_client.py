"""The asyncio client, the streaming and repository calls, embeddings and client-side
preprocessing, against a real server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.support import TINY_LABELS, ServerThread, build_tiny_classifier, png_bytes
from tlserve.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    StreamResult,
    Unavailable,
)

RED, GREEN, BLUE = (250, 10, 10), (10, 240, 10), (5, 5, 255)

#: Client-side preprocessing matches Classify (stated in docs/calling.md): the
#: model sees the very same pixels, so the same labels in the same order and
#: scores within 1e-6 -- except for a large JPEG, which the server decodes on its
#: DCT-downscaling fast path (server/core/decode.py: mean difference at most 2 grey
#: levels); there the top label agrees and scores are within 1e-3.
EXACT_TOLERANCE = 1e-6
FAST_JPEG_TOLERANCE = 1e-3


@pytest.fixture
def server(shared_server: ServerThread) -> ServerThread:
    """The tests here only call the server: they share one (tests/conftest.py)."""
    return shared_server


async def test_every_unary_call_async(server: ServerThread) -> None:
    async with AsyncClient(server.target, timeout=10) as client:
        await client.wait_until_ready(timeout=30)
        assert await client.server_ready()
        assert await client.health() == "SERVING"
        [labels] = await client.classify(png_bytes(RED), model="tiny", top_k=2)
        assert [p.label for p in labels][:1] == ["red"] and len(labels) == 2
        meta = await client.model_metadata("tiny")
        assert meta.card is not None and meta.card.labels == TINY_LABELS
        assert meta.inputs[0].name == "images" and meta.inputs[0].datatype == "UINT8"
        rows = np.zeros((2, 8, 8, 3), np.uint8)
        rows[1, ..., 2] = 255
        out = await client.infer("tiny", {"images": rows})
        assert out["probabilities"].shape == (2, 3) and out["probabilities"].dtype == np.float32
        assert out["probabilities"][1].argmax() == 2
        np.testing.assert_allclose(out["embeddings"][1], [0, 0, 1], atol=1e-6)


async def test_async_errors_are_typed_and_chained(server: ServerThread) -> None:
    async with AsyncClient(server.target) as client:
        with pytest.raises(ModelNotFound) as caught:
            await client.classify(png_bytes(RED), model="ghost", timeout=5)
        assert isinstance(caught.value.__cause__, grpc.RpcError)
        with pytest.raises(InvalidInput):
            await client.classify(b"junk", model="tiny", timeout=5)
        noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), np.uint8)
        with pytest.raises(DeadlineExceeded):
            await client.classify(noise, model="tiny", timeout=1e-6)
    with pytest.raises(ValueError, match="is closed"):
        await client.server_ready(timeout=1)


async def test_many_concurrent_tasks_share_one_client(server: ServerThread) -> None:
    colours = [RED, GREEN, BLUE] * 10
    async with AsyncClient(server.target, timeout=30) as client:
        results = await asyncio.gather(
            *(client.classify(png_bytes(c), model="tiny") for c in colours)
        )
    assert [r[0][0].label for r in results] == ["red", "green", "blue"] * 10


async def test_unreachable_async_is_unavailable_after_retries(dead_target: str) -> None:
    async with AsyncClient(dead_target) as client:
        with pytest.raises(Unavailable):
            await client.model_metadata("tiny", timeout=5)
        with pytest.raises(Unavailable):
            await client.health(timeout=5)


def test_embed_returns_one_row_per_image(server: ServerThread) -> None:
    with Client(server.target, timeout=10) as client:
        vectors = client.embed([png_bytes(RED), png_bytes(BLUE)], model="tiny")
        single = client.embed(png_bytes(GREEN), model="tiny")
    assert vectors.shape == (2, 3) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[0], np.array(RED) / 255, atol=1e-6)
    np.testing.assert_allclose(single[0], np.array(GREEN) / 255, atol=1e-6)


def test_list_models_shows_each_version_and_state(server: ServerThread) -> None:
    with Client(server.target, timeout=10) as client:
        models = client.list_models()
        ready = client.list_models(ready_only=True)
    assert [(m.name, m.version, m.state) for m in models] == [("tiny", "1", "READY")]
    assert ready == models


def test_classify_stream_sync_from_a_blocking_generator(server: ServerThread) -> None:
    def camera() -> Iterator[bytes]:
        for colour in (RED, GREEN, BLUE, RED):
            time.sleep(0.05)  # a source that blocks between frames
            yield png_bytes(colour)

    # The client's default deadline (here 0.02 s) is for calls, not for a stream's life.
    with Client(server.target, timeout=0.02) as client:
        results = list(client.classify_stream(camera(), model="tiny", top_k=1))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.predictions[0].label for r in results] == ["red", "green", "blue", "red"]
    assert all(r.error is None and len(r.predictions) == 1 for r in results)


async def test_classify_stream_async_reports_a_bad_image_and_goes_on(
    server: ServerThread,
) -> None:
    async def frames() -> AsyncIterator[bytes]:
        for data in (png_bytes(RED), b"not an image", png_bytes(BLUE)):
            yield data

    async with AsyncClient(server.target, timeout=30) as client:
        results: list[StreamResult] = [
            r async for r in client.classify_stream(frames(), model="tiny")
        ]
    assert [r.index for r in results] == [0, 1, 2]
    assert results[0].predictions[0].label == "red"
    assert isinstance(results[1].error, InvalidInput) and results[1].predictions == []
    assert results[2].predictions[0].label == "blue"


async def test_a_stream_to_an_unknown_model_reports_not_found(server: ServerThread) -> None:
    async with AsyncClient(server.target, timeout=30) as client:
        results = [r async for r in client.classify_stream([png_bytes(RED)], model="ghost")]
    assert len(results) == 1 and isinstance(results[0].error, ModelNotFound)


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like image: smooth colour gradients plus noise, so resizing matters."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + rng.integers(0, 128)], axis=-1
    )
    noisy = base + rng.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_client_side_preprocessing_matches_the_server(server: ServerThread) -> None:
    photos = [_photo(size, seed) for seed, size in enumerate([(640, 480), (97, 211), (8, 8)])]
    jpeg = io.BytesIO()
    photos[0].save(jpeg, format="JPEG", quality=90)
    images = [*photos, jpeg.getvalue(), np.asarray(photos[1]), photos[2].convert("L")]
    with Client(server.target, timeout=30) as client:
        remote = client.classify(images, model="tiny", top_k=3)
        local = client.classify(images, model="tiny", top_k=3, preprocess="client")
        with pytest.raises(ValueError, match="preprocess"):
            client.classify(images, model="tiny", preprocess="gpu")  # type: ignore[arg-type]
    gaps = [
        max(abs(a.score - b.score) for a, b in zip(here, there, strict=True))
        for there, here in zip(remote, local, strict=True)
    ]
    for i, (there, here) in enumerate(zip(remote, local, strict=True)):
        if i == 3:  # the 640x480 JPEG: the server's fast path
            assert here[0].label == there[0].label
            assert gaps[i] <= FAST_JPEG_TOLERANCE, gaps
        else:
            assert [p.label for p in here] == [p.label for p in there]
            assert gaps[i] <= EXACT_TOLERANCE, gaps


def test_client_side_preprocessing_of_an_unknown_model_is_not_found(server: ServerThread) -> None:
    with Client(server.target, timeout=10) as client, pytest.raises(ModelNotFound):
        client.classify(png_bytes(RED), model="ghost", preprocess="client")


def test_client_side_preprocessing_follows_a_hot_swap(model_repo: Path) -> None:
    """After a new version is swapped in, labels and input size are the new version's."""
    running = ServerThread(model_repo, poll_interval=3600.0)

    def publish(version: int, labels: tuple[str, ...], size: int) -> None:
        staging = model_repo / "tiny" / f".tmp-{version}"
        build_tiny_classifier(staging / "model.onnx", labels=labels, size=size)
        staging.rename(model_repo / "tiny" / str(version))
        running.call(running.running.core.registry.poll_once())

    try:
        with Client(running.target, timeout=30) as client:

            def labels() -> tuple[str, str]:
                here = client.classify(png_bytes(RED), model="tiny", preprocess="client")
                there = client.classify(png_bytes(RED), model="tiny")
                return here[0][0].label, there[0][0].label

            assert labels() == ("red", "red")
            publish(2, ("warm", "grass", "sky"), size=8)  # new labels, same input
            assert labels() == ("warm", "warm")
            publish(3, ("hot", "leaf", "sea"), size=12)  # new labels and input size
            assert labels() == ("hot", "hot")
    finally:
        running.stop()


def test_sync_client_from_many_threads_with_every_call(server: ServerThread) -> None:
    with Client(server.target, timeout=30) as client:

        def work(i: int) -> str:
            colour = (RED, GREEN, BLUE)[i % 3]
            if i % 4 == 0:
                return client.classify(png_bytes(colour), model="tiny", preprocess="client")[0][
                    0
                ].label
            if i % 4 == 1:
                vec = client.embed(png_bytes(colour), model="tiny")
                return TINY_LABELS[int(vec[0].argmax())]
            if i % 4 == 2:
                assert client.server_ready()
            return client.classify(png_bytes(colour), model="tiny")[0][0].label

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(work, range(40)))
    assert got == [("red", "green", "blue")[i % 3] for i in range(40)]
