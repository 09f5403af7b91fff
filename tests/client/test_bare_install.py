"""`pip install tlserve` with no extras is the client SDK: no torch, no onnxruntime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(
    args: list[str | Path], *, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


_CACHES = shutil.ignore_patterns(
    ".venv", "*.egg-info", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"
)
# Only at the top: a models/ folder below it is a package (server/models/).
_TOP_ONLY = {"build", "dist", "examples", "models"}


def _not_source(folder: str, names: list[str]) -> set[str]:
    skipped = set(_CACHES(folder, names))
    return skipped | (_TOP_ONLY & set(names)) if Path(folder) == ROOT else skipped


def test_the_bare_install_is_the_client_without_heavy_dependencies(tmp_path: Path) -> None:
    assert (ROOT / "pyproject.toml").is_file()
    source = tmp_path / "src"
    # A copy, so the build writes its build/ and egg-info there, not into the repo.
    shutil.copytree(ROOT, source, ignore=_not_source)
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"

    installed = _run([python, "-m", "pip", "install", "-q", source], cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    for heavy in ("torch", "onnxruntime", "onnxruntime-gpu", "prometheus-client"):
        shown = _run([python, "-m", "pip", "show", heavy], cwd=tmp_path, timeout=120)
        assert shown.returncode != 0, f"{heavy} is installed by the bare install"

    check = _run(
        [
            python,
            "-c",
            "import sys, tlserve.client\n"
            "from tlserve.client import Client, InvalidInput, ModelCard\n"
            "from tlserve.contract.images import prepare_image\n"
            "from tlserve.contract.codec import encode_request_inputs\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'prometheus_client')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "Client('127.0.0.1:1').close()\n"
            "print(tlserve.client.__file__)\n",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Imported from the fresh venv, not from the repo or the dev venv.
    assert Path(check.stdout.strip()).is_relative_to(venv)
