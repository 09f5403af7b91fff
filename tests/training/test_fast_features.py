"""Features through onnxruntime: torch's numbers within tolerance, cached, with a fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.shapes import TINY_BACKBONE, write_shapes
from tlserve.contract.errors import ExportError
from tlserve.contract.images import prepare_image
from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.backbone.layers import PooledFeatures
from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.data.folders import Sample, load_dataset
from tlserve.training.features import onnx_features
from tlserve.training.features.extract import extract_features
from tlserve.training.features.onnx_features import check_against_torch, embedder_key
from tlserve.training.features.onnx_trace import EMBEDDING_ATOL, EMBEDDING_RTOL


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return create_backbone(TINY_BACKBONE)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, 4, seed=3)
    return load_dataset(root, test_fraction=0.5).train


@pytest.fixture(scope="module")
def embedder(backbone: Backbone) -> ImageEmbedder:
    """The last layer and an earlier stage, pooled and concatenated (what ``auto`` probes)."""
    return ImageEmbedder(PooledFeatures(backbone.module, (None, -2)), backbone.preprocessing)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, embedder: ImageEmbedder, samples: list[Sample]
) -> Path:
    """A cache folder holding the embedder's export (made once: exporting takes seconds)."""
    directory = tmp_path_factory.mktemp("export")
    extract_features(embedder, samples[:2], engine="onnxruntime", export_dir=directory, workers=0)
    return directory


def test_onnxruntime_features_equal_torch_on_real_images(
    embedder: ImageEmbedder, samples: list[Sample], exported: Path
) -> None:
    fast = extract_features(
        embedder, samples, engine="onnxruntime", export_dir=exported, workers=0, batch_size=4
    )
    exact = extract_features(embedder, samples, engine="torch", workers=0, batch_size=4)
    assert (
        fast.embeddings.shape
        == exact.embeddings.shape
        == (len(samples), sum(embedder.backbone.widths))
    )
    assert fast.labels.tolist() == exact.labels.tolist()
    np.testing.assert_allclose(
        fast.embeddings, exact.embeddings, rtol=EMBEDDING_RTOL, atol=EMBEDDING_ATOL
    )


def test_the_export_is_cached_by_weights(
    embedder: ImageEmbedder,
    samples: list[Sample],
    exported: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert [p.name for p in exported.iterdir()] == [f"embedder-{embedder_key(embedder)}.onnx"]

    def no_export(*_: object) -> bytes:
        raise AssertionError("the cached export should have been used")

    monkeypatch.setattr(onnx_features, "export_embedder", no_export)
    caplog.set_level(logging.INFO, logger="tlserve.training.features.onnx_features")
    # auto takes a cached export even for a handful of images.
    extract_features(embedder, samples[:3], export_dir=exported, workers=0)
    assert "features through onnxruntime" in caplog.text

    other = ImageEmbedder(
        PooledFeatures(create_backbone(TINY_BACKBONE).module, (None, -2)), embedder.preprocessing
    )
    assert embedder_key(other) != embedder_key(embedder)  # fresh random weights


def test_a_broken_cached_export_is_replaced(
    embedder: ImageEmbedder,
    samples: list[Sample],
    exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (good,) = exported.iterdir()
    model = good.read_bytes()
    broken = tmp_path / good.name
    broken.write_bytes(b"half an onnx file")
    monkeypatch.setattr(onnx_features, "export_embedder", lambda *_: model)
    features = extract_features(
        embedder, samples[:2], engine="onnxruntime", export_dir=tmp_path, workers=0
    )
    assert len(features.labels) == 2
    assert "ignoring the cached export" in caplog.text
    assert broken.read_bytes() == model


def test_auto_does_not_export_for_a_few_images(
    embedder: ImageEmbedder, samples: list[Sample], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_export(*_: object) -> bytes:
        raise AssertionError("exporting costs more than it saves on a few images")

    monkeypatch.setattr(onnx_features, "export_embedder", no_export)
    features = extract_features(embedder, samples[:3], export_dir=tmp_path, workers=0)
    assert len(features.labels) == 3 and not list(tmp_path.iterdir())


def test_a_failed_export_falls_back_to_torch_unless_onnxruntime_is_insisted_on(
    embedder: ImageEmbedder,
    samples: list[Sample],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def failing(*_: object) -> bytes:
        raise ExportError("cannot export this module")

    monkeypatch.setattr(onnx_features, "export_embedder", failing)
    monkeypatch.setattr(onnx_features, "EXPORT_PAYS_OFF_IMAGES", 1)
    features = extract_features(embedder, samples[:3], export_dir=tmp_path, workers=0)
    assert len(features.labels) == 3
    assert "features through torch: cannot export this module" in caplog.text
    with pytest.raises(ExportError, match="cannot export"):
        extract_features(embedder, samples[:3], engine="onnxruntime", workers=0)


def test_a_disagreeing_export_is_refused(embedder: ImageEmbedder, samples: list[Sample]) -> None:
    images = np.stack([prepare_image(path, embedder.preprocessing) for path, _ in samples[:2]])
    with torch.inference_mode():
        exact = embedder(torch.from_numpy(images.copy())).numpy()
    assert check_against_torch(lambda _: exact.copy(), embedder, images) == 0.0
    with pytest.raises(ExportError, match="differ from torch"):
        check_against_torch(lambda _: exact + 1e-2, embedder, images)


def test_torch_path_leaves_the_shared_module_as_it_was(
    embedder: ImageEmbedder, samples: list[Sample]
) -> None:
    extract_features(embedder, samples[:2], engine="torch", workers=0)
    weights = [p for p in embedder.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)


def test_unknown_engine(embedder: ImageEmbedder, samples: list[Sample]) -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        extract_features(embedder, samples[:1], engine="tensorrt", workers=0)


@pytest.mark.slow
def test_lite0_features_through_onnxruntime_equal_torch(tmp_path: Path) -> None:
    """The real backbone on the example's real images, at the stated tolerance."""
    root = Path(__file__).resolve().parents[2] / "examples" / "fashion-mnist"
    samples = load_dataset(root).test[:24]
    embedder = ImageEmbedder.from_backbone(create_backbone("tf_efficientnet_lite0"))
    fast = extract_features(embedder, samples, engine="onnxruntime", export_dir=tmp_path, workers=0)
    exact = extract_features(embedder, samples, engine="torch", workers=0)
    np.testing.assert_allclose(
        fast.embeddings, exact.embeddings, rtol=EMBEDDING_RTOL, atol=EMBEDDING_ATOL
    )
    assert len(list(tmp_path.glob("embedder-*.onnx"))) == 1
