"""The control plane: what the server says about its models, and loading on demand.

The servicers' non-inference RPCs (readiness, metadata, configuration,
repository index, load and unload) call this and nothing else, as MLServer's
servicers call its model-repository handlers; the data path is
:class:`~tlserve.server.core.inference.InferenceCore`'s. Both are testable without a
gRPC server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tlserve.contract.errors import TlserveError
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.server.core.describe import model_config
from tlserve.server.core.inference import InferenceCore
from tlserve.server.models.lifecycle import VersionState
from tlserve.server.models.repository import LoadedModel, scan_repository

__all__ = ["ModelControl", "ModelDescription"]


@dataclass(frozen=True)
class ModelDescription:
    """One served version and the versions listed beside it in ModelMetadata."""

    loaded: LoadedModel
    versions: tuple[str, ...]


class ModelControl:
    """Model state as the KServe v2 and Triton control RPCs see it."""

    def __init__(self, core: InferenceCore) -> None:
        self._core = core
        self._registry = core.registry

    def model_ready(self, name: str, version: str) -> bool:
        """Ready to answer: the version is loaded and the server is not draining."""
        try:
            self._registry.get(name, version)
        except TlserveError:
            return False
        return self._core.ready

    def providers(self) -> list[str]:
        """The execution providers the loaded versions run on, sorted."""
        return sorted(
            {m.model.provider for n in self._registry.names() for m in self._registry.versions(n)}
        )

    def describe(self, name: str, version: str) -> ModelDescription:
        """The version asked for (newest if ""), and the versions to list with it."""
        loaded = self._registry.get(name, version)
        if version:
            return ModelDescription(loaded, (version,))
        return ModelDescription(
            loaded, tuple(m.version for m in self._registry.versions(loaded.name))
        )

    def config(self, name: str, version: str) -> pb.ModelConfig:
        """Triton's ModelConfig of one served version."""
        return model_config(self._registry.get(name, version), self._registry.config)

    async def index(self, *, ready_only: bool) -> list[VersionState]:
        """Every version on disk or in memory with its state (READY ones if ``ready_only``)."""
        on_disk = await asyncio.to_thread(scan_repository, self._registry.config.model_repository)
        rows = self._registry.index(on_disk)
        return [r for r in rows if r.state == "READY" or not ready_only]

    async def load(self, name: str) -> None:
        await self._registry.load(name)

    async def unload(self, name: str) -> None:
        await self._registry.unload(name)
