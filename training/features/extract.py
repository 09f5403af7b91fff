"""Compute embeddings for a list of images with a frozen backbone.

Images are decoded and resized by :func:`tlserve.contract.images.prepare_image`
(the function the server and client use too) in decoding threads,
batched as uint8 ``[N, H, W, 3]``, and embedded by :class:`ImageEmbedder`, the
module that is exported. A file that cannot be read is skipped and reported,
never fatal: one bad JPEG in ten thousand should not cost a training run.

The embedder runs on the fastest path that gives torch's numbers
(:mod:`~tlserve.training.features.onnx_features`: onnxruntime on a cached export of
it, else torch in channels_last).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tlserve.contract.card import Preprocessing
from tlserve.contract.errors import InvalidInput
from tlserve.contract.images import prepare_image
from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.data.folders import Sample
from tlserve.training.features.onnx_features import batch_embedder

__all__ = [
    "Features",
    "SkippedFile",
    "default_workers",
    "extract_features",
    "load_images",
    "prepare_images",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedFile:
    """An image that could not be used, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Features:
    """Embeddings ``[N, D]`` float32, labels ``[N]`` int64, the paths they came from."""

    embeddings: np.ndarray
    labels: np.ndarray
    paths: tuple[Path, ...]
    skipped: tuple[SkippedFile, ...]


# One loaded item: its index in the sample list, the image (None if unreadable)
# and the reason it could not be read.
_Item = tuple[int, np.ndarray | None, str]
_Batch = tuple[list[int], np.ndarray | None, list[tuple[int, str]]]


class _PreparedImages:
    def __init__(self, paths: Sequence[Path], spec: Preprocessing) -> None:
        self.paths = list(paths)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        try:
            return index, prepare_image(self.paths[index], self.spec), ""
        except (InvalidInput, OSError) as exc:
            return index, None, str(exc)


def _collate(items: list[_Item]) -> _Batch:
    good = [(index, image) for index, image, _ in items if image is not None]
    failed = [(index, reason) for index, image, reason in items if image is None]
    # np.stack copies: the batch is writable (torch.from_numpy wants that).
    images = np.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, failed


def default_workers() -> int:
    """Decoding threads: one per CPU this process may use, at most 8.

    A decoding thread mostly waits in Pillow with the GIL released, and the
    backbone's threads take the cores while it is idle. Measured on 2 CPUs
    (``make bench-train``, 320 images, lite0 at 224 px), two runs: 0, 1 and
    2 threads gave 80.7/78.9%, 78.2/81.7% and 82.7/79.5% of raw
    onnxruntime's images/s, the same within noise (DataLoader processes,
    before: 1 worker 71.8%).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _batches(
    paths: Sequence[Path], spec: Preprocessing, batch_size: int, workers: int
) -> Iterator[_Batch]:
    """Prepared batches in order; ``workers`` threads decode ahead of the backbone.

    Threads, not processes: Pillow's decoding and resizing and the
    backbone's onnxruntime run release the GIL, and a decoded image never
    has to be pickled across a pipe (150 KB at 224 px). Measured in
    ``make bench-train`` on 2 cores.
    """
    images = _PreparedImages(paths, spec)
    chunks = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]

    def load(chunk: range) -> _Batch:
        return _collate([images[i] for i in chunk])

    if workers == 0:
        yield from map(load, chunks)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="tlserve-decode") as pool:
        ahead: deque[Future[_Batch]] = deque()
        for chunk in chunks:
            ahead.append(pool.submit(load, chunk))
            if len(ahead) > workers:  # a bounded read-ahead: memory stays a few batches
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _progress(total: int, what: str) -> tqdm[None]:
    # disable=None: a bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=what, unit="img", disable=None, leave=False)


def extract_features(
    embedder: ImageEmbedder,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    engine: str = "auto",
    export_dir: Path | None = None,
) -> Features:
    """Embed every readable image in ``samples``; report the rest.

    Images are prepared with ``embedder.preprocessing``. ``workers=0`` decodes in
    this thread, between batches; ``None`` picks :func:`default_workers`.
    ``engine`` (``auto``, ``onnxruntime``, ``torch``) and ``export_dir`` (where
    the exported embedder is cached; None: not kept) are described in
    :func:`~tlserve.training.features.onnx_features.batch_embedder`.
    """
    workers = default_workers() if workers is None else workers
    paths = [path for path, _ in samples]
    loader = _batches(paths, embedder.preprocessing, batch_size, workers)
    kept: list[int] = []
    chunks: list[np.ndarray] = []
    skipped: list[SkippedFile] = []
    start = time.perf_counter()
    with (
        batch_embedder(embedder, engine=engine, directory=export_dir, images=len(paths)) as embed,
        _progress(len(paths), "features") as bar,
    ):
        for indices, images, failed in loader:
            bar.update(len(indices) + len(failed))
            for index, reason in failed:
                log.warning("skipping unreadable image %s: %s", paths[index], reason)
                skipped.append(SkippedFile(paths[index], reason))
            if images is None:
                continue
            chunks.append(embed(images))
            kept.extend(indices)
    seconds = time.perf_counter() - start
    log.info(
        "embedded %d images in %.1f s (%.1f images/s, %d skipped)",
        len(kept),
        seconds,
        len(kept) / max(seconds, 1e-9),
        len(skipped),
    )
    dim = int(chunks[0].shape[1]) if chunks else 0
    return Features(
        embeddings=np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32),
        labels=np.array([samples[i][1] for i in kept], dtype=np.int64),
        paths=tuple(paths[i] for i in kept),
        skipped=tuple(skipped),
    )


def load_images(paths: Sequence[Path], spec: Preprocessing, *, limit: int = 8) -> np.ndarray:
    """Up to ``limit`` readable images as uint8 ``[N, H, W, 3]`` (unreadable ones passed over)."""
    images: list[np.ndarray] = []
    for path in paths:
        if len(images) >= limit:
            break
        try:
            images.append(prepare_image(path, spec))
        except (InvalidInput, OSError):
            continue
    if not images:
        raise ValueError("none of the given images could be read")
    return np.stack(images)


def prepare_images(
    samples: Sequence[Sample],
    spec: Preprocessing,
    *,
    batch_size: int = 64,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[SkippedFile, ...]]:
    """Decode every readable image once: uint8 ``[N, H, W, 3]``, labels ``[N]``, skipped.

    For training the whole network, which sees each image every epoch: at
    the sizes tlserve targets (thousands of images) they fit in memory.
    """
    workers = default_workers() if workers is None else workers
    paths = [path for path, _ in samples]
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[SkippedFile] = []
    with _progress(len(paths), "decode") as bar:
        for indices, images, failed in _batches(paths, spec, batch_size, workers):
            bar.update(len(indices) + len(failed))
            for index, reason in failed:
                log.warning("skipping unreadable image %s: %s", paths[index], reason)
                skipped.append(SkippedFile(paths[index], reason))
            if images is not None:
                chunks.append(images)
                kept.extend(indices)
    empty = np.zeros((0, spec.height, spec.width, 3), np.uint8)
    images_all = np.concatenate(chunks) if chunks else empty
    labels = np.array([samples[i][1] for i in kept], dtype=np.int64)
    return images_all, labels, tuple(skipped)
