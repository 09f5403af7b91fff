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
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MODEL_FILENAME", "next_version", "publish", "validate_model_name"]

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ATTEMPTS = 20


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name, else raise ``ValueError``.

    Letters, digits, ``-``, ``_`` and ``.``, starting with a letter or digit,
    at most 128 characters: no separators, no ``..``, nothing hidden.
    """
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return name


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
    validate_model_name(name)
    extras = dict(extra_files or {})
    for filename in extras:
        if filename == MODEL_FILENAME or not _NAME.fullmatch(filename) or ".." in filename:
            raise ValueError(f"invalid extra file name {filename!r}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        shutil.copyfile(model_file, staging / MODEL_FILENAME)
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
