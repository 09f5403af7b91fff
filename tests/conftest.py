"""Shared fixtures (a tiny real ONNX classifier, a real server on port 0) and the
one rule for skipping GPU tests; the helpers they use live in ``tests/support.py``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerThread, build_tiny_classifier, write_test_pki

_CACHE_DIR = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse-order",
        action="store_true",
        help="run the collected tests last to first: every test must pass alone and in any order",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The one way a GPU test is skipped: ``@pytest.mark.gpu`` (or
    ``@pytest.mark.gpu(provider="TensorrtExecutionProvider")``) skips it where this
    onnxruntime lacks that provider (CUDA by default). ``--reverse-order`` reverses
    the run."""
    if config.getoption("--reverse-order"):
        items.reverse()
    try:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
    except ImportError:
        available = set()
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        provider = marker.kwargs.get("provider", "CUDAExecutionProvider")
        if provider not in available:
            item.add_marker(pytest.mark.skip(reason=f"onnxruntime has no {provider} here"))


def pytest_configure(config: pytest.Config) -> None:
    # `tlserve serve` processes that tests start listen for HTTP only where a test
    # asks (a fixed default port would clash between tests run side by side).
    os.environ.setdefault("TLSERVE_HTTP_PORT", "0")
    # Feature caches and checkpoints of every test (and of the tlserve processes
    # tests start) go to a throwaway folder, never the user's ~/.cache.
    if "TLSERVE_CACHE_DIR" not in os.environ:
        config.stash[_CACHE_DIR] = tempfile.mkdtemp(prefix="tlserve-test-cache-")
        os.environ["TLSERVE_CACHE_DIR"] = config.stash[_CACHE_DIR]


def pytest_unconfigure(config: pytest.Config) -> None:
    created = config.stash.get(_CACHE_DIR, None)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        del os.environ["TLSERVE_CACHE_DIR"]


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    build_tiny_classifier(repo / "tiny" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One server for the tests of a module that only call it: none changes what it
    serves or counts on its metrics (a module opts in by overriding ``server``)."""
    repo = tmp_path_factory.mktemp("shared") / "models"
    build_tiny_classifier(repo / "tiny" / "1" / "model.onnx")
    running = ServerThread(repo)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with server and client certificates (:func:`write_test_pki`)."""
    return write_test_pki(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def server(model_repo: Path) -> Iterator[ServerThread]:
    running = ServerThread(model_repo)
    yield running
    running.stop()
