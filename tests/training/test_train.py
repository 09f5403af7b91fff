"""End to end: a folder of images in, a served-ready model version out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.training.shapes import TINY_BACKBONE
from tlserve.contract.card import ModelCard
from tlserve.contract.errors import InvalidInput
from tlserve.contract.images import prepare_image
from tlserve.training import DataError, train
from tlserve.training.data.folders import load_dataset


@pytest.mark.slow
def test_train_publishes_a_model_that_classifies(shapes_folder: Path, tmp_path: Path) -> None:
    broken = shapes_folder / "train" / "circle" / "000.png"
    broken.write_bytes(b"not an image")
    repo = tmp_path / "models"

    result = train(
        shapes_folder,
        model_repository=repo,
        name="shapes",
        strategy="linear",
        backbone=TINY_BACKBONE,
        workers=2,
    )

    assert result.version_dir == repo / "shapes" / "1" and result.version == 1
    assert result.model_path == result.version_dir / "model.onnx"
    assert sorted(p.name for p in (repo / "shapes").iterdir()) == ["1"]
    assert result.classes == ("circle", "square", "triangle")
    assert (result.held_out, result.n_train, result.n_test) == ("test", 35, 18)
    assert [s.path for s in result.skipped] == [broken]
    assert result.test_accuracy is not None and result.test_accuracy >= 0.7  # chance: 0.33
    assert result.params["C"] in (0.001, 0.01, 0.1, 1.0, 10.0)

    card = ModelCard.from_props(
        {p.key: p.value for p in onnx.load(str(result.model_path)).metadata_props}
    )
    assert card == result.card
    assert card is not None
    assert card.labels == result.classes and card.backbone == TINY_BACKBONE
    assert card.strategy == "linear"
    assert card.metrics["test_accuracy"] == result.test_accuracy
    assert card.data_fingerprint == load_dataset(shapes_folder).fingerprint()
    assert card.created.endswith("+00:00") and card.tlserve_version
    assert card.notes["C"] == str(result.params["C"])

    # What the server will do: prepare_image with the card's preprocessing, run onnxruntime.
    dataset = load_dataset(shapes_folder)
    images = np.stack([prepare_image(path, card.preprocessing) for path, _ in dataset.test])
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"images": images})
    labels = np.array([label for _, label in dataset.test])
    assert float((probabilities.argmax(axis=1) == labels).mean()) == pytest.approx(
        result.test_accuracy
    )

    report = json.loads((result.version_dir / "report.json").read_text())
    assert report["evaluation"]["test"]["accuracy"] == result.test_accuracy
    assert np.array(report["evaluation"]["test"]["confusion"]).sum() == 18
    assert report["skipped"] == [{"path": str(broken), "reason": result.skipped[0].reason}]
    assert report["export_check"]["probabilities_max_abs_diff"] <= 1e-4


def test_bad_inputs_fail_before_any_work(shapes_folder: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    with pytest.raises(InvalidInput, match="not a valid model name"):
        train(shapes_folder, model_repository=repo, name="../up", backbone=TINY_BACKBONE)
    with pytest.raises(ValueError, match="unknown strategy"):
        train(shapes_folder, model_repository=repo, name="ok", strategy="magic")
    with pytest.raises(DataError, match="does not exist"):
        train(tmp_path / "nowhere", model_repository=repo, name="ok")
    assert not repo.exists()
