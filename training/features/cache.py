"""An on-disk cache of embeddings, so trying another head costs no forward pass.

Keyed by everything the embeddings depend on: the images (path, label, size,
modification time), the embedder's weights (a hash of its state dict), the
layers, the preprocessing, and :data:`EXTRACTION` (how the numbers are
computed). Every function takes its directory from the caller; only
:func:`default_cache_dir` reads the environment, once, where a run's
settings are read (``$TLSERVE_CACHE_DIR/features`` or
``~/.cache/tlserve/features``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from tlserve.training.data.folders import Sample
from tlserve.training.features.extract import Features, SkippedFile

__all__ = ["EXTRACTION", "default_cache_dir", "feature_key", "load_features", "save_features"]

log = logging.getLogger(__name__)

# Part of every key. Features from onnxruntime and from torch (NCHW or
# channels_last) agree within the export check's tolerances, so they share
# one tag; a path that changes the numbers beyond them (bf16, int8) needs its own.
EXTRACTION = "float32"
CACHE_DIR_VARIABLE = "TLSERVE_CACHE_DIR"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The features folder: ``$TLSERVE_CACHE_DIR/features``, else ``~/.cache/tlserve/features``.

    ``environ`` defaults to :data:`os.environ`. Call it once, where a run's
    settings are read, and pass the folder down.
    """
    configured = (os.environ if environ is None else environ).get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured) / "features"
    return Path.home() / ".cache" / "tlserve" / "features"


def feature_key(samples: Sequence[Sample], module: torch.nn.Module, what: str) -> str:
    """A hex digest of the samples' files, the module's weights and ``what`` (layers, spec)."""
    digest = hashlib.sha256(f"{EXTRACTION} {what}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for path, label in samples:
        try:
            stat = path.stat()
            digest.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\t{label}\tmissing\n".encode())
    return digest.hexdigest()


def load_features(directory: Path, key: str) -> Features | None:
    """The features saved under ``key`` in ``directory``; None if absent or unreadable."""
    path = directory / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            features = Features(
                embeddings=data["embeddings"],
                labels=data["labels"],
                paths=tuple(Path(p) for p in data["paths"].tolist()),
                skipped=tuple(
                    SkippedFile(Path(p), str(r))
                    for p, r in zip(data["skipped_paths"], data["skipped_reasons"], strict=True)
                ),
            )
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable feature cache %s: %s", path, exc)
        return None
    log.info("features from cache %s (%d images)", path.name, len(features.labels))
    return features


def save_features(directory: Path, key: str, features: Features) -> None:
    """Write atomically (temp file + rename); a failure to cache is only a warning."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as tmp:
            np.savez(
                tmp,
                embeddings=features.embeddings,
                labels=features.labels,
                paths=np.array([str(p) for p in features.paths], dtype=str),
                skipped_paths=np.array([str(s.path) for s in features.skipped], dtype=str),
                skipped_reasons=np.array([s.reason for s in features.skipped], dtype=str),
            )
        os.replace(tmp.name, directory / f"{key}.npz")
    except OSError as exc:
        log.warning("could not cache features in %s: %s", directory, exc)
