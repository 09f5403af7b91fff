"""The model repository on disk, and one loaded model version.

Layout (Triton's): ``<root>/<name>/<version>/model.onnx`` with integer
versions. Directories whose names start with a dot are in-progress writes
and are never read. :func:`load_version` loads and warms one version beside
whatever else is serving; :func:`retire` waits for its in-flight requests and
releases it. Which versions serve, and when they change, is
:mod:`tlserve.server.models.lifecycle`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tlserve.contract.rules import MODEL_FILE, valid_model_name
from tlserve.server.batching.batcher import DynamicBatcher
from tlserve.server.batching.statistics import ModelStatistics
from tlserve.server.config import ServerConfig
from tlserve.server.metrics import ServerMetrics
from tlserve.server.models.runtime import OnnxModel
from tlserve.server.models.tuning import Tuning, publish_tuning, tune_model, withdraw_tuning
from tlserve.server.models.variants import VariantChoice, choose_variant

__all__ = [
    "LoadedModel",
    "file_identity",
    "load_version",
    "retire",
    "scan_repository",
]

log = logging.getLogger(__name__)


def scan_repository(root: Path) -> dict[str, list[int]]:
    """Model name -> its complete versions on disk, oldest first."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    found: dict[str, list[int]] = {}
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        if not valid_model_name(model_dir.name):
            log.warning("skipping %s: not a valid model name", model_dir)
            continue
        versions = sorted(
            int(v.name)
            for v in model_dir.iterdir()
            if v.name.isdigit() and (v / MODEL_FILE).is_file()
        )
        if versions:
            found[model_dir.name] = versions
        else:
            log.debug("skipping %s: no <version>/%s inside", model_dir, MODEL_FILE)
    return found


def file_identity(root: Path, name: str, version: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a version's model file: changes when it is replaced.

    An atomic replace (write beside, rename over) gives a new inode; an edit
    in place a new size or mtime. None when the file is gone.
    """
    try:
        stat = (root / name / version / MODEL_FILE).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class LoadedModel:
    """One model version, loaded, warm and with its batcher running.

    ``inflight`` counts requests that hold it (see :meth:`use`): retiring
    waits until it is zero, so unloading or swapping never fails a request.
    """

    name: str
    version: str
    model: OnnxModel
    batcher: DynamicBatcher
    executor: ThreadPoolExecutor
    stats: ModelStatistics
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    tuning: Tuning | None = None  # the settings it serves with (server/models/tuning.py)
    variant: VariantChoice | None = None  # the file it serves, and why (server/models/variants.py)

    def __post_init__(self) -> None:
        self._idle.set()

    @contextlib.contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Hold this version for one request."""
        self.inflight += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request holds it; False if ``timeout`` passed first."""
        if self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


async def load_version(
    config: ServerConfig, metrics: ServerMetrics, name: str, version: str
) -> LoadedModel:
    """Load one version, warm it up and start its batcher; nothing else changes."""
    version_dir = config.model_repository / name / version
    # Which file serves (server/models/variants.py), then load, warm up before ready
    # and (server/models/tuning.py) pick the settings, all before the version is ready.
    variant = await asyncio.to_thread(choose_variant, version_dir, config)
    path = variant.path
    model, tuning, lone = await asyncio.to_thread(tune_model, path, config, metrics)
    # `instances` threads: that many batches of the one session run at once.
    executor = ThreadPoolExecutor(
        max_workers=tuning.instances, thread_name_prefix=f"ort-{name}-{version}"
    )
    stats = ModelStatistics()
    batcher = DynamicBatcher(
        model.run,
        name=name,
        batchable=model.batchable,
        executor=executor,
        metrics=metrics,
        max_batch_size=tuning.max_batch_size,
        max_queue_delay=config.max_queue_delay,
        max_queue_size=config.max_queue_size,
        preferred_batch_sizes=config.preferred_batch_sizes,
        instances=tuning.instances,
        stats=stats,
        row_seconds=tuning.batch1_seconds,
        fresh_first=config.queue_policy == "adaptive-lifo",
        max_wait=config.max_queue_time or None,
        run_alone=lone.run if lone is not None else None,
    )
    await batcher.start()
    metrics.model_info.labels(name, version, model.provider).set(1)
    log.info(
        "loaded model %r version %s from %s on %s (%d classes, %d instance(s)); variant %s "
        "[%s] on %s: %s",
        *(name, version, path, model.provider, len(model.card.labels) if model.card else 0),
        *(tuning.instances, variant.variant, variant.source, variant.host, variant.reason),
    )
    publish_tuning(metrics, name, version, tuning)
    metrics.model_variant.labels(name, version, variant.variant, variant.source).set(1)
    return LoadedModel(
        name, version, model, batcher, executor, stats, tuning=tuning, variant=variant
    )


async def retire(loaded: LoadedModel, metrics: ServerMetrics, grace: float) -> None:
    """Wait (up to ``grace``) for in-flight requests, then stop and release it."""
    if not await loaded.wait_idle(grace):
        log.warning(
            "model %r version %s: %d requests still in flight after %.1fs; stopping anyway",
            loaded.name,
            loaded.version,
            loaded.inflight,
            grace,
        )
    await loaded.batcher.stop()
    loaded.executor.shutdown(wait=False)
    with contextlib.suppress(KeyError):
        metrics.model_info.remove(loaded.name, loaded.version, loaded.model.provider)
    if loaded.tuning is not None:
        withdraw_tuning(metrics, loaded.name, loaded.version, loaded.tuning)
    if loaded.variant is not None:
        with contextlib.suppress(KeyError):
            metrics.model_variant.remove(
                loaded.name, loaded.version, loaded.variant.variant, loaded.variant.source
            )
    log.info("unloaded model %r version %s", loaded.name, loaded.version)
