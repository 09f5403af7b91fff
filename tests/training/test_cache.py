"""The feature cache: the folder is the caller's; only default_cache_dir reads the environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlserve.training.features.cache import (
    default_cache_dir,
    feature_key,
    load_features,
    save_features,
)
from tlserve.training.features.extract import Features, SkippedFile


def _features() -> Features:
    return Features(
        embeddings=np.arange(6, dtype=np.float32).reshape(2, 3),
        labels=np.array([0, 1]),
        paths=(Path("a.png"), Path("b.png")),
        skipped=(SkippedFile(Path("c.png"), "truncated"),),
    )


def test_the_given_folder_is_used_and_the_environment_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "from-the-environment"
    monkeypatch.setenv("TLSERVE_CACHE_DIR", str(elsewhere))
    chosen = tmp_path / "chosen"
    save_features(chosen, "k", _features())
    found = load_features(chosen, "k")
    assert found is not None
    np.testing.assert_array_equal(found.embeddings, _features().embeddings)
    assert found.paths == _features().paths and found.skipped == _features().skipped
    assert load_features(tmp_path / "other", "k") is None
    assert not elsewhere.exists()


def test_default_cache_dir_reads_the_given_environment(tmp_path: Path) -> None:
    assert default_cache_dir({"TLSERVE_CACHE_DIR": str(tmp_path)}) == tmp_path / "features"
    assert default_cache_dir({}) == Path.home() / ".cache" / "tlserve" / "features"


def test_an_unreadable_cache_file_is_a_miss(tmp_path: Path) -> None:
    (tmp_path / "k.npz").write_bytes(b"not a zip")
    assert load_features(tmp_path, "k") is None


def test_the_key_follows_weights_files_and_settings(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    module = torch.nn.Linear(2, 2)
    key = feature_key([(image, 0)], module, "last")
    assert feature_key([(image, 0)], module, "last") == key
    assert feature_key([(image, 1)], module, "last") != key
    assert feature_key([(image, 0)], module, "-2") != key
    with torch.no_grad():
        module.weight.add_(1.0)
    assert feature_key([(image, 0)], module, "last") != key
