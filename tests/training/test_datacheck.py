"""The data check finds planted label flips, duplicates and a train/test leak."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlserve.training.backbone.backbones import Backbone
from tlserve.training.check.datacheck import (
    DataCheck,
    check_before_training,
    check_data,
    confident_learning,
    without_duplicates,
)
from tlserve.training.data.folders import load_dataset
from tlserve.training.features.extract import Features, SkippedFile
from tlserve.training.fit.strategies import FitContext
from tlserve.training.report.thumbnails import data_check_files, data_check_markdown

FLIPS = 4
FASHION = Path(__file__).resolve().parents[2] / "examples" / "fashion-mnist"


def _write(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (value, 255 - value, 128)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataCheck, set[str], set[str], str]:
    """Three well-separated classes of embeddings of real files, with planted problems.

    FLIPS training labels are changed, two training images have a copy, and
    one training image is also in test (a leak); one file is unreadable.
    """
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 2.0
    features = {}
    flipped: set[str] = set()
    for split, n in (("train", 60), ("test", 15)):
        labels = np.arange(n) % 3
        embeddings = (centres[labels] + rng.normal(size=(n, 32))).astype(np.float32)
        paths = [_write(root / split / f"{i:03d}.png", 4 * i) for i in range(n)]
        if split == "train":
            for i in range(FLIPS):
                labels[i] = (labels[i] + 1) % 3
                flipped.add(paths[i])
            copies = {_write(root / "train" / f"copy-{i}.png", 4 * i) for i in (10, 20)}
            embeddings = np.r_[embeddings, embeddings[[10, 20]] + 1e-3]
            labels = np.r_[labels, labels[[10, 20]]]
            paths += sorted(copies)
            train_row = embeddings[30]
        else:
            embeddings[5], labels[5] = train_row, 0  # the leak (train row 30 is class 0)
            leaked = paths[5]
        skipped = (SkippedFile(root / "train" / "broken.png", "cannot decode"),)
        features[split] = Features(
            embeddings, labels, tuple(Path(p) for p in paths), skipped if split == "train" else ()
        )
    return check_data(features, ("a", "b", "c")), flipped, copies, leaked


def test_planted_label_flips_are_found(
    planted: tuple[DataCheck, set[str], set[str], str],
) -> None:
    check, flipped, _, _ = planted
    found = {issue.path for issue in check.label_issues}
    recall = len(found & flipped) / len(flipped)
    assert recall >= 0.75, (recall, sorted(found))
    issue = next(i for i in check.label_issues if i.path in flipped)
    assert issue.given != issue.predicted and issue.given_probability < 0.5
    assert "cleanlab" in check.method
    # The planted flips head the list (what the report's thumbnails show).
    assert flipped <= {i.path for i in check.label_issues[: FLIPS + 1]}


def test_duplicates_and_the_leak_are_found(
    planted: tuple[DataCheck, set[str], set[str], str],
) -> None:
    check, _, copies, leaked = planted
    in_pairs = {pair.a for pair in check.duplicates} | {pair.b for pair in check.duplicates}
    assert copies <= in_pairs
    (leak,) = check.leaks
    assert leaked in (leak.a, leak.b) and {leak.split_a, leak.split_b} == {"train", "test"}
    assert check.duplicates[0].leak  # leaks are listed first
    assert [s.path.name for s in check.unreadable] == ["broken.png"]
    assert len(check.duplicates) == 3  # and no pair of merely similar images
    lines = check.findings()
    assert any("straddle train and held-out" in line and "1 near-dup" in line for line in lines)
    assert any("unreadable" in line for line in lines)
    assert "1 leaks across splits" in check.summary()


def test_report_json_lists_suspects_and_grids_are_pngs(
    planted: tuple[DataCheck, set[str], set[str], str],
) -> None:
    check, _, _, leaked = planted
    saved = json.loads(json.dumps(check.to_dict()))
    assert any(pair["leak"] and leaked in (pair["a"], pair["b"]) for pair in saved["duplicates"])
    assert all(Path(issue["path"]).exists() for issue in saved["label_issues"])
    assert DataCheck.from_dict(saved) == check  # what report.json keeps reads back whole
    files = data_check_files(check)
    assert set(files) == {"label_issues.png", "duplicates.png"}
    for data in files.values():
        assert Image.open(io.BytesIO(data)).format == "PNG"
    markdown = "\n".join(data_check_markdown(check))
    assert "## Data check" in markdown and "(label_issues.png)" in markdown


def test_drop_duplicates_keeps_the_held_out_copy(
    planted: tuple[DataCheck, set[str], set[str], str],
) -> None:
    check, _, _, leaked = planted
    splits = {
        "train": [
            (Path(p), 0) for pair in check.duplicates for p in (pair.a, pair.b) if "train" in p
        ],
        "test": [(Path(leaked), 0)],
    }
    kept, dropped = without_duplicates(splits, check.duplicates)
    assert kept["test"] == splits["test"]
    assert len(dropped) == len(check.duplicates) and leaked not in dropped


def test_confident_learning_rule_without_cleanlab() -> None:
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9], [0.95, 0.05]])
    labels = np.array([0, 0, 1, 1, 1])  # the last one looks like class 0
    assert confident_learning(labels, probabilities).tolist() == [4]


def test_imbalance_is_reported() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, np.int64), np.ones(10, np.int64)]
    embeddings = rng.normal(size=(50, 8)).astype(np.float32) + labels[:, None] * 4
    paths = tuple(Path(f"x{i}.png") for i in range(50))
    check = check_data(
        {"train": Features(embeddings, labels, paths, (SkippedFile(Path("bad.png"), "no"),))},
        ("many", "few"),
    )
    assert check.imbalance == 4.0
    assert any("imbalanced 4.0:1 (many 40, few 10" in line for line in check.findings())


def test_check_before_training_drops_only_when_asked(
    shapes_folder: Path, tiny_backbone: Backbone, caplog: pytest.LogCaptureFixture
) -> None:
    copy = shapes_folder / "test" / "circle" / "leaked.png"
    shutil.copy(sorted((shapes_folder / "train" / "circle").iterdir())[0], copy)
    dataset = load_dataset(shapes_folder)
    context = FitContext(
        classes=dataset.classes, backbone=tiny_backbone, splits=dataset.splits(), workers=0
    )
    with caplog.at_level(logging.INFO):
        check, same = check_before_training(context)
    assert same is context and len(check.leaks) >= 1
    assert any("straddle train and held-out" in r.message for r in caplog.records)
    _, dropped = check_before_training(context, drop_duplicates=True)
    assert len(dropped.splits["train"]) == len(context.splits["train"]) - len(check.leaks)
    assert dropped.splits["test"] == context.splits["test"]  # held-out images stay
    assert len(dropped.features("train").labels) == len(dropped.splits["train"])
