"""The out-of-distribution score: its fit, its graph output against NumPy, its card entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.training.shapes import TINY_BACKBONE, write_shapes
from tlserve.contract.card import ModelCard
from tlserve.contract.errors import ExportError
from tlserve.training.artifact.export import export_onnx
from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.check.ood import (
    OOD_RTOL,
    OodScorer,
    compare_ood,
    fit_for_model,
    fit_ood,
    knn_distance,
    ood_auroc,
    reference_ood_images,
)
from tlserve.training.data.folders import load_dataset
from tlserve.training.features.extract import extract_features, load_images
from tlserve.training.fit.strategies import FitContext
from tlserve.training.fit.strategies.linear import LinearProbe
from tlserve.training.fit.strategies.trees import fit_trees

LABELS = ("circle", "square", "triangle")


def _clusters(rng: np.random.Generator, n: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes around distinct directions (what embeddings look like)."""
    centres = rng.normal(size=(3, dim)) * 3 + 10
    labels = rng.integers(0, 3, size=n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


def test_score_is_higher_away_from_the_training_data() -> None:
    rng = np.random.default_rng(0)
    train, labels = _clusters(rng, 300)
    scorer = fit_ood(train, labels)
    held_out = train[:100] + rng.normal(scale=0.1, size=(100, 16))
    far = rng.normal(size=(100, 16)) * 3 - 10  # other directions entirely
    assert ood_auroc(scorer.score(held_out), scorer.score(far)) > 0.99
    assert ood_auroc(knn_distance(train, held_out), knn_distance(train, far)) > 0.99
    fitted = scorer.with_threshold(held_out, percentile=99.0)
    assert fitted.threshold is not None and fitted.n_threshold == 100
    assert np.mean(scorer.score(held_out) > fitted.threshold) <= 0.01
    assert np.all(scorer.score(far) > fitted.threshold)
    # The length of an embedding does not matter, only its direction.
    np.testing.assert_allclose(scorer.score(far * 7.0), scorer.score(far), rtol=1e-9)


def test_card_records_threshold_method_and_auroc() -> None:
    rng = np.random.default_rng(1)
    train, labels = _clusters(rng, 60)
    scorer = fit_ood(train, labels).with_threshold(train[:20])
    card = ModelCard(labels=LABELS, preprocessing=create_backbone(TINY_BACKBONE).preprocessing)
    on_card = OodScorer(**{**scorer.__dict__, "auroc": 0.97}).on_card(card)
    assert on_card.metrics["ood_threshold"] == pytest.approx(scorer.threshold)
    assert on_card.metrics["ood_auroc"] == 0.97
    assert on_card.notes["ood_method"] == "mahalanobis-shared-covariance"
    assert "60 training embeddings, 3 classes" in on_card.notes["ood_fitted_on"]
    assert "scikit-image" in on_card.notes["ood_auroc_against"]
    # Round trip through the ONNX metadata the server reads.
    assert ModelCard.from_props(on_card.to_props()) == on_card


def test_compare_ood_refuses_past_the_tolerance() -> None:
    reference = np.array([10.0, 20.0])
    assert compare_ood(np.float32(reference * (1 + OOD_RTOL / 10)), reference) < OOD_RTOL
    with pytest.raises(ExportError, match="ood_score differs"):
        compare_ood(np.float32(reference * 1.01), reference)
    with pytest.raises(ExportError, match="ood_score is float64"):
        compare_ood(reference, reference)
    with pytest.raises(ExportError):
        compare_ood(np.full(2, np.nan, np.float32), reference)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageEmbedder]:
    root = tmp_path_factory.mktemp("ood")
    write_shapes(root / "train", 8, seed=3)
    torch.manual_seed(0)
    return root, ImageEmbedder.from_backbone(create_backbone(TINY_BACKBONE))


@pytest.mark.parametrize("kind", ["linear", "trees"])
def test_graph_output_equals_the_numpy_reference(
    shapes_data: tuple[Path, ImageEmbedder], tmp_path: Path, kind: str
) -> None:
    root, embedder = shapes_data
    dataset = load_dataset(root / "train")
    features = extract_features(embedder, dataset.train + dataset.test, workers=0)
    scorer = fit_ood(features.embeddings, features.labels).with_threshold(features.embeddings)
    head: torch.nn.Module | object
    if kind == "trees":
        head, _ = fit_trees(features.embeddings, features.labels, classes=LABELS, max_iter=5)
    else:
        head = torch.nn.Linear(features.embeddings.shape[1], len(LABELS)).eval()
    card = ModelCard(labels=LABELS, preprocessing=embedder.preprocessing, strategy=kind)
    images = load_images(list(features.paths), card.preprocessing, limit=24)
    path = tmp_path / "model.onnx"
    check = export_onnx(embedder, head, card, path, images[:4], ood=scorer)  # type: ignore[arg-type]
    assert check.ood_score_max_rel_diff is not None and check.ood_score_max_rel_diff <= OOD_RTOL

    model = onnx.load(str(path))
    shapes = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert shapes["ood_score"] == ["batch"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeddings, scores = session.run(["embeddings", "ood_score"], {"images": images})
    assert scores.dtype == np.float32 and scores.shape == (len(images),)
    np.testing.assert_allclose(scores, scorer.score(embeddings), rtol=1e-4)
    # A noise image is further from the shapes than the shapes are.
    noise = np.random.default_rng(0).integers(0, 256, size=(4, *images.shape[1:]), dtype=np.uint8)
    (noise_scores,) = session.run(["ood_score"], {"images": noise})
    assert float(noise_scores.min()) > float(np.median(scores))
    card_read = ModelCard.from_props(session.get_modelmeta().custom_metadata_map)
    assert card_read is not None
    assert card_read.metrics["ood_threshold"] == pytest.approx(scorer.threshold)


def test_reference_ood_set_is_natural_photos() -> None:
    spec = create_backbone(TINY_BACKBONE).preprocessing
    images = reference_ood_images(spec)
    assert images is not None and images.shape == (90, spec.height, spec.width, 3)
    assert images.dtype == np.uint8


def test_fit_for_model_thresholds_on_held_out_and_measures_auroc(
    shapes_folder: Path, tiny_backbone: Backbone
) -> None:
    dataset = load_dataset(shapes_folder)
    context = FitContext(
        classes=dataset.classes, backbone=tiny_backbone, splits=dataset.splits(), workers=0
    )
    fitted = LinearProbe(c_grid=(0.1,)).fit(context)
    scorer = fit_for_model(context, fitted)
    test = context.features("test")
    assert scorer.n_fitted == len(context.features("train").labels)
    assert scorer.n_threshold == len(test.labels)
    assert scorer.threshold == pytest.approx(np.percentile(scorer.score(test.embeddings), 99))
    # A random network tells shapes from photos only somewhat; the figure is recorded.
    assert scorer.auroc is not None and 0.0 <= scorer.auroc <= 1.0
