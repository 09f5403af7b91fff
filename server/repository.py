"""The model repository on disk and the registry of loaded models.

Layout (Triton's): ``<root>/<name>/<version>/model.onnx`` with integer
versions; the newest version of each model is served. Directories whose
names start with a dot are in-progress writes and are never read.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tlserve.client.errors import ModelNotFound, Unavailable
from tlserve.server.batcher import DynamicBatcher
from tlserve.server.config import ServerConfig
from tlserve.server.metrics import ServerMetrics
from tlserve.server.runtime import OnnxModel

__all__ = ["LoadedModel", "ModelRegistry", "scan_repository", "valid_model_name"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def valid_model_name(name: str) -> bool:
    """Letters, digits, ``_ . -``; no path separators, no leading dot."""
    return bool(_NAME.fullmatch(name)) and ".." not in name


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
            if v.name.isdigit() and (v / "model.onnx").is_file()
        )
        if versions:
            found[model_dir.name] = versions
        else:
            log.warning("skipping %s: no <version>/model.onnx inside", model_dir)
    return found


@dataclass
class LoadedModel:
    """One model version, loaded, warm and with its batcher running."""

    name: str
    version: str
    model: OnnxModel
    batcher: DynamicBatcher
    executor: ThreadPoolExecutor


class ModelRegistry:
    """Loads the repository's models and hands them out by name."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self.failed: dict[str, str] = {}
        self.loaded = False

    @property
    def ready(self) -> bool:
        """True once every model found at start-up is loaded and warm."""
        return self.loaded and not self.failed

    def names(self) -> list[str]:
        return sorted(self._models)

    def has(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model; ModelNotFound (naming what exists) otherwise."""
        loaded = self._models.get(name)
        if loaded is None:
            if not self.loaded:
                raise Unavailable("models are still loading; retry shortly")
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"no model named {name!r} (loaded: {known})")
        if version and version != loaded.version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} (serving version {loaded.version})"
            )
        return loaded

    async def load_all(self) -> None:
        """Load and warm the newest version of every model in the repository."""
        for name, versions in scan_repository(self._config.model_repository).items():
            try:
                self._models[name] = await self._load(name, str(versions[-1]))
            except Exception as exc:
                log.exception("model %r failed to load", name)
                self.failed[name] = str(exc)
        self.loaded = True

    async def _load(self, name: str, version: str) -> LoadedModel:
        path = self._config.model_repository / name / version / "model.onnx"
        loop = asyncio.get_running_loop()
        # One thread per model: its batches run one at a time, off the loop.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        cfg = self._config
        model = await loop.run_in_executor(
            executor,
            lambda: OnnxModel(path, device=cfg.device, intra_op_threads=cfg.intra_op_threads),
        )
        # Warm up before ready: the first run allocates and picks kernels.
        await loop.run_in_executor(executor, model.run, model.dummy_inputs())
        batcher = DynamicBatcher(
            model.run,
            name=name,
            batchable=model.batchable,
            executor=executor,
            metrics=self._metrics,
            max_batch_size=cfg.max_batch_size,
            max_queue_delay=cfg.max_queue_delay,
            max_queue_size=cfg.max_queue_size,
        )
        await batcher.start()
        self._metrics.model_info.labels(name, version, model.provider).set(1)
        log.info(
            "loaded model %r version %s from %s on %s (%d classes)",
            name,
            version,
            path,
            model.provider,
            len(model.card.labels) if model.card else 0,
        )
        return LoadedModel(name, version, model, batcher, executor)

    async def stop(self) -> None:
        """Stop every batcher and release the sessions."""
        for loaded in self._models.values():
            await loaded.batcher.stop()
            loaded.executor.shutdown(wait=True)
        self._models.clear()
