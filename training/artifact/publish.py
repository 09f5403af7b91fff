"""Put a verified model into a model repository, atomically.

Layout (Triton's)::

    <repository>/<name>/<version>/model.onnx
                                  report.json ...

Files are written and fsynced into a hidden ``<repository>/<name>/.tmp-<uuid>/``
and the directory is renamed to the next integer version in one ``rename``:
a server watching the repository sees either no version or a complete one.
Servers (and Triton) ignore non-integer directory names, so the temp dir is
never mistaken for a version.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import MODEL_FILE, check_model_name, valid_model_name

__all__ = ["next_version", "publish"]

log = logging.getLogger(__name__)

_ATTEMPTS = 20


def next_version(model_dir: Path) -> int:
    """1 + the largest integer version directory in ``model_dir`` (1 if none)."""
    versions = (
        [
            int(child.name)
            for child in model_dir.iterdir()
            if child.is_dir() and child.name.isdigit()
        ]
        if model_dir.is_dir()
        else []
    )
    return max(versions, default=0) + 1


def publish(
    model_file: Path, repository: Path, name: str, extra_files: Mapping[str, bytes] | None = None
) -> Path:
    """Publish ``model_file`` as the next version of ``name``; return the version directory.

    ``extra_files`` (file name → content, e.g. ``report.json``) are written
    beside ``model.onnx``. Concurrent publishers each get their own version.
    """
    check_model_name(name)
    extras = dict(extra_files or {})
    for filename in extras:
        # Extra files follow the model-name rule: no separators, nothing hidden.
        if filename == MODEL_FILE or not valid_model_name(filename):
            raise InvalidInput(f"invalid extra file name {filename!r}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        shutil.copyfile(model_file, staging / MODEL_FILE)
        for filename, content in extras.items():
            (staging / filename).write_bytes(content)
        for child in staging.iterdir():
            _fsync(child)
        _fsync(staging)
        version_dir = _rename_to_next_version(staging, model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _fsync(model_dir)
    log.info("published %s", version_dir)
    return version_dir


def _rename_to_next_version(staging: Path, model_dir: Path) -> Path:
    for _ in range(_ATTEMPTS):
        version = next_version(model_dir)
        while (model_dir / str(version)).exists():  # e.g. a stray file named "3"
            version += 1
        target = model_dir / str(version)
        try:
            staging.rename(target)
            return target
        except OSError as exc:
            # Another publisher took this version between listing and renaming
            # (rename onto a non-empty directory fails; onto an empty one it succeeds,
            # which is why existing names are skipped above).
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise RuntimeError(
        f"could not claim a version directory in {model_dir} after {_ATTEMPTS} tries"
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
