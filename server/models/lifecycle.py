"""The registry of serving models: version policy, hot swap, polling, unload.

For each model the registry holds the versions the policy selects (see
:mod:`tlserve.server.policy`). :meth:`ModelRegistry.sync` brings one model in
line with the repository: versions newly selected are loaded and warmed
*beside* the serving ones, then the model's version map is replaced in one
assignment (the swap is atomic on the event loop), and versions no longer
selected are retired once their in-flight requests finish. A version that
fails to load leaves what was serving untouched.

Model control: ``poll`` rescans the repository every ``poll_interval``
seconds (new models load, new versions swap in, deleted models unload);
``explicit`` changes models only through the repository RPCs. Both load every
model at start-up. Explicit unload is refused under polling, as in Triton:
the next poll would undo it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from tlserve.contract.errors import ModelNotFound, NotAllowed, Unavailable
from tlserve.contract.rules import check_model_name
from tlserve.server.config import ServerConfig
from tlserve.server.metrics import ServerMetrics
from tlserve.server.models.repository import (
    LoadedModel,
    file_identity,
    load_version,
    retire,
    scan_repository,
)

__all__ = ["ModelRegistry", "NotAllowed", "VersionState"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionState:
    """One row of the repository index."""

    name: str
    version: str
    state: str  # READY, LOADING, UNAVAILABLE (Triton's words)
    reason: str = ""


class ModelRegistry:
    """Loads the repository's models, hands them out, and keeps them current."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.config = config
        self._metrics = metrics
        self.policy = config.version_policy
        # name -> version -> loaded, oldest version first; replaced, never mutated.
        self._serving: dict[str, dict[str, LoadedModel]] = {}
        self._loading: set[tuple[str, str]] = set()
        self._errors: dict[tuple[str, str], str] = {}  # last load failure per version
        # The model file each failure was seen with: a changed file is retried.
        self._failed_files: dict[tuple[str, str], tuple[int, int, int] | None] = {}
        self.failed: dict[str, str] = {}  # models with nothing serving after a failure
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self.loaded = False

    @property
    def ready(self) -> bool:
        """True once every model selected at start-up is loaded and warm."""
        return self.loaded and not self.failed

    def names(self) -> list[str]:
        return sorted(self._serving)

    def has(self, name: str) -> bool:
        return name in self._serving

    def versions(self, name: str) -> list[LoadedModel]:
        """The serving versions of ``name``, oldest first (empty if none)."""
        return list(self._serving.get(name, {}).values())

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The version asked for, or the newest; ModelNotFound (naming what exists) otherwise."""
        versions = self._serving.get(name)
        if not versions:
            if not self.loaded:
                raise Unavailable("models are still loading; retry shortly")
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"no model named {name!r} (loaded: {known})")
        if not version:
            return versions[max(versions, key=int)]
        loaded = versions.get(version)
        if loaded is None:
            serving = ", ".join(versions)
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} (serving version {serving})"
            )
        return loaded

    @contextlib.contextmanager
    def acquire(self, name: str, version: str = "") -> Iterator[LoadedModel]:
        """Look up and hold a version for one request (no await in between)."""
        with self.get(name, version).use() as loaded:
            yield loaded

    async def load_all(self) -> None:
        """Load every model at start-up; then poll, if so configured."""
        found = await asyncio.to_thread(scan_repository, self.config.model_repository)
        for name, versions in found.items():
            await self._sync(name, versions)
        self.loaded = True
        if self.config.model_control == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: (re)load ``name`` from disk now, per the version policy."""
        check_model_name(name)
        found = await asyncio.to_thread(scan_repository, self.config.model_repository)
        if name not in found:
            raise ModelNotFound(f"no model {name!r} in the repository (need <version>/model.onnx)")
        await self._sync(name, found[name])
        if name in self.failed:
            raise Unavailable(f"model {name!r} failed to load: {self.failed[name]}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: stop serving ``name`` once its in-flight requests finish."""
        check_model_name(name)
        if self.config.model_control != "explicit":
            raise NotAllowed(
                "explicit unload needs TLSERVE_MODEL_CONTROL=explicit; under polling, "
                "remove the model from the repository instead"
            )
        if name not in self._serving and name not in self.failed:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        await self._sync(name, [])

    def index(self, on_disk: dict[str, list[int]]) -> list[VersionState]:
        """Every version on disk or serving, with its state and why it is not READY."""
        rows = []
        for name in sorted(set(on_disk) | set(self._serving)):
            serving = self._serving.get(name, {})
            for version in sorted({*map(str, on_disk.get(name, [])), *serving}, key=int):
                key = (name, version)
                if version in serving:
                    rows.append(VersionState(name, version, "READY"))
                elif key in self._loading:
                    rows.append(VersionState(name, version, "LOADING"))
                else:
                    why = self._errors.get(key) or f"not selected (version policy {self.policy})"
                    rows.append(VersionState(name, version, "UNAVAILABLE", why))
        return rows

    async def _sync(self, name: str, on_disk: list[int]) -> None:
        """Serve exactly the versions the policy selects from ``on_disk``."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self._serving.get(name, {})
            wanted = [str(v) for v in self.policy.select(on_disk)]
            fresh: dict[str, LoadedModel] = {}
            for version in wanted:
                if version not in current:
                    loaded = await self._load_version(name, version)
                    if loaded is not None:
                        fresh[version] = loaded
            # Keep a serving version the policy still wants, or one whose
            # replacement failed to load: never leave a model with nothing.
            keep = {v: m for v, m in current.items() if v in wanted}
            if not keep and not fresh and any((name, v) in self._errors for v in wanted):
                keep = current
            updated = dict(sorted({**keep, **fresh}.items(), key=lambda kv: int(kv[0])))
            if updated:
                self._serving[name] = updated  # the atomic swap
                self.failed.pop(name, None)
            else:
                self._serving.pop(name, None)
                failures = [self._errors[(name, v)] for v in wanted if (name, v) in self._errors]
                if failures:
                    self.failed[name] = failures[-1]
                else:
                    self.failed.pop(name, None)
            gone = [m for v, m in current.items() if v not in updated]
        if fresh or gone:
            log.info(
                "model %r now serves version(s) %s", name, ", ".join(updated) or "none (unloaded)"
            )
        await asyncio.gather(*(retire(m, self._metrics, self.config.grace) for m in gone))
        for _ in gone:
            self._metrics.model_loads.labels(name, "unloaded").inc()

    async def _load_version(self, name: str, version: str) -> LoadedModel | None:
        # Taken before loading: a file replaced during the load is new again.
        identity = await asyncio.to_thread(
            file_identity, self.config.model_repository, name, version
        )
        self._loading.add((name, version))
        try:
            loaded = await load_version(self.config, self._metrics, name, version)
        except Exception as exc:
            log.exception("model %r version %s failed to load", name, version)
            self._failed_files[(name, version)] = identity
            # The index is readable by clients: no server paths in the reason.
            reason = str(exc).replace(str(self.config.model_repository), "<repository>")
            self._errors[(name, version)] = f"{type(exc).__name__}: {reason}"
            self._metrics.model_loads.labels(name, "failed").inc()
            return None
        finally:
            self._loading.discard((name, version))
        self._errors.pop((name, version), None)
        self._failed_files.pop((name, version), None)
        self._metrics.model_loads.labels(name, "ok").inc()
        return loaded

    async def poll_once(self) -> None:
        """Bring every model in line with the repository once (the poller's step)."""
        found = await asyncio.to_thread(scan_repository, self.config.model_repository)
        changed = await asyncio.to_thread(self._changed_failures)
        for name in sorted(set(found) | set(self._serving) | set(self.failed)):
            versions = found.get(name, [])
            current = set(self._serving.get(name, {}))
            wanted = {str(v) for v in self.policy.select(versions)}
            # A version that failed to load is tried again once its file
            # changes (fixed in place), or while the model has nothing serving.
            stuck = {v for v in wanted if (name, v) in self._errors and (name, v) not in changed}
            if wanted != current and not (stuck and name not in self.failed and current):
                await self._sync(name, versions)

    def _changed_failures(self) -> set[tuple[str, str]]:
        """Failed versions whose model file is not the one that failed (runs in a thread)."""
        root = self.config.model_repository
        return {
            key
            for key, identity in self._failed_files.items()
            if file_identity(root, *key) != identity
        }

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # a bad scan must not end polling
                log.exception("polling the model repository failed")

    async def stop(self) -> None:
        """Stop polling, then every batcher; release the sessions."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        serving = [m for versions in self._serving.values() for m in versions.values()]
        self._serving.clear()
        await asyncio.gather(*(retire(m, self._metrics, 0.0) for m in serving))
