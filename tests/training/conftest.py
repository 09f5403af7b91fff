"""Fixtures for the training tests: a tiny random backbone and a tiny real dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.shapes import TINY_BACKBONE, fit_context, write_shapes
from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.fit.strategies import FitContext


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature caches and checkpoints go to the test's temp dir, never ~/.cache."""
    monkeypatch.setenv("TLSERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def shapes_folder(tmp_path: Path) -> Path:
    """ImageFolder layout: train/ (12 per class) and test/ (6 per class)."""
    root = tmp_path / "shapes"
    write_shapes(root / "train", 12, seed=1)
    write_shapes(root / "test", 6, seed=2)
    return root


@pytest.fixture
def tiny_backbone() -> Backbone:
    return create_backbone(TINY_BACKBONE)


@pytest.fixture
def shapes_context(shapes_folder: Path, tiny_backbone: Backbone) -> FitContext:
    """A strategy's context on the shapes with the tiny backbone (batches of 8, no workers)."""
    return fit_context(shapes_folder, tiny_backbone)
