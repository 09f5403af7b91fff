"""Finding labelled images: layouts, splits, fingerprints, and every DataError."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.shapes import write_shapes
from tlserve.training.data.folders import DataError, load_dataset, split_samples


def test_train_and_test_folders(shapes_folder: Path) -> None:
    dataset = load_dataset(shapes_folder)
    assert dataset.classes == ("circle", "square", "triangle")
    assert dataset.held_out == "test"
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (36, 0, 18)
    assert all(path.parent.name == dataset.classes[label] for path, label in dataset.test)
    assert dataset.counts()["test"] == {"circle": 6, "square": 6, "triangle": 6}


def test_flat_layout_gets_a_reproducible_stratified_split(tmp_path: Path) -> None:
    write_shapes(tmp_path, 10)
    first = load_dataset(tmp_path, seed=3, test_fraction=0.2)
    assert first.held_out == "split"
    assert first.counts() == {
        "train": {"circle": 8, "square": 8, "triangle": 8},
        "test": {"circle": 2, "square": 2, "triangle": 2},
    }
    assert not set(first.train) & set(first.test)
    assert load_dataset(tmp_path, seed=3).test == first.test
    assert load_dataset(tmp_path, seed=4).test != first.test


def test_train_without_test_is_split_and_val_is_kept(tmp_path: Path) -> None:
    write_shapes(tmp_path / "train", 5)
    write_shapes(tmp_path / "val", 2, seed=9)
    dataset = load_dataset(tmp_path)
    assert dataset.held_out == "split"
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (12, 6, 3)


def test_hidden_files_ignored_suffix_case_insensitive_nested(tmp_path: Path) -> None:
    write_shapes(tmp_path / "train", 2, suffix=".PNG")
    (tmp_path / "train" / "circle" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "train" / "circle" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".cache").mkdir()
    nested = tmp_path / "train" / "square" / "batch2"
    nested.mkdir()
    (tmp_path / "train" / "square" / "000.PNG").rename(nested / "000.png")
    dataset = load_dataset(tmp_path)
    assert dataset.classes == ("circle", "square", "triangle")
    assert len(dataset.train) + len(dataset.test) == 6
    assert nested / "000.png" in {path for path, _ in dataset.train + dataset.test}


def test_fingerprint_tracks_content_size_and_names(tmp_path: Path) -> None:
    write_shapes(tmp_path, 4)
    before = load_dataset(tmp_path).fingerprint()
    assert before.startswith("sha256:") and before == load_dataset(tmp_path).fingerprint()
    (tmp_path / "circle" / "000.png").write_bytes(b"\x89PNG different size")
    assert load_dataset(tmp_path).fingerprint() != before


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    write_shapes(tmp_path / "train", 3)
    for kind in ("square", "triangle"):
        for path in (tmp_path / "train" / kind).iterdir():
            path.unlink()
        (tmp_path / "train" / kind).rmdir()
    with pytest.raises(DataError, match=r"only one class \('circle'\)"):
        load_dataset(tmp_path)


def test_class_without_images_is_named(tmp_path: Path) -> None:
    write_shapes(tmp_path / "train", 3)
    (tmp_path / "train" / "hexagon").mkdir()
    (tmp_path / "train" / "hexagon" / "readme.txt").write_text("todo")
    with pytest.raises(DataError, match=r"'hexagon'.*holds no images"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("split", ["test", "val"])
def test_held_out_class_missing_from_train(tmp_path: Path, split: str) -> None:
    write_shapes(tmp_path / "train", 3)
    write_shapes(tmp_path / split, 1)
    (tmp_path / split / "circle").rename(tmp_path / split / "oval")
    with pytest.raises(DataError, match=f"{split}/ has class 'oval' which train/ lacks"):
        load_dataset(tmp_path)


def test_test_folder_without_train(tmp_path: Path) -> None:
    write_shapes(tmp_path / "test", 1)
    with pytest.raises(DataError, match="no train/ folder"):
        load_dataset(tmp_path)


def test_bad_test_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset(tmp_path, test_fraction=1.0)


def test_split_samples_is_stratified_and_spares_tiny_classes(tmp_path: Path) -> None:
    write_shapes(tmp_path, 10)
    samples = load_dataset(tmp_path, test_fraction=0.1).train  # 9 per class
    samples = [s for s in samples if s[1] != 2 or s[0].name < "003"]  # triangles: 3 left
    train, val = split_samples(samples, 0.25, seed=1)
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert sorted(label for _, label in val) == [0, 0, 1, 1]  # round(9 * 0.25) each
    assert split_samples(samples, 0.25, seed=1) == (train, val)
