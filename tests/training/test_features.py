"""Feature extraction: THE preprocessing, the exported module, bad files skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlserve.contract.images import prepare_image
from tlserve.training.backbone.backbones import Backbone
from tlserve.training.backbone.modules import ImageEmbedder
from tlserve.training.data.folders import load_dataset
from tlserve.training.features.extract import extract_features, load_images


def test_features_are_the_embedder_on_prepared_images(
    shapes_folder: Path, tiny_backbone: Backbone
) -> None:
    samples = load_dataset(shapes_folder).test[:5]
    embedder = ImageEmbedder.from_backbone(tiny_backbone)
    features = extract_features(embedder, samples, batch_size=2, workers=0)
    assert features.embeddings.dtype == np.float32
    assert features.embeddings.shape == (5, tiny_backbone.feature_dim)
    assert features.labels.tolist() == [label for _, label in samples]
    images = np.stack([prepare_image(path, tiny_backbone.preprocessing) for path, _ in samples])
    with torch.inference_mode():
        expected = embedder(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(features.embeddings, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_and_vanished_images_are_skipped_and_reported(
    shapes_folder: Path, tiny_backbone: Backbone, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = load_dataset(shapes_folder)
    corrupt = shapes_folder / "train" / "square" / "003.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    truncated = shapes_folder / "train" / "circle" / "004.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    vanished = shapes_folder / "train" / "triangle" / "005.png"
    vanished.unlink()

    features = extract_features(
        ImageEmbedder.from_backbone(tiny_backbone), dataset.train, batch_size=8, workers=workers
    )
    assert {skipped.path for skipped in features.skipped} == {corrupt, truncated, vanished}
    assert all(skipped.reason for skipped in features.skipped)
    assert len(features.labels) == len(features.embeddings) == len(dataset.train) - 3
    assert corrupt not in features.paths
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 3


def test_a_batch_of_only_bad_images(tmp_path: Path, tiny_backbone: Backbone) -> None:
    bad = tmp_path / "a.png"
    bad.write_bytes(b"nope")
    features = extract_features(ImageEmbedder.from_backbone(tiny_backbone), [(bad, 0)], workers=0)
    assert features.embeddings.shape[0] == 0 and len(features.skipped) == 1


def test_load_images_passes_over_bad_files(shapes_folder: Path, tiny_backbone: Backbone) -> None:
    paths = [path for path, _ in load_dataset(shapes_folder).test]
    paths[0].write_bytes(b"broken")
    images = load_images(paths, tiny_backbone.preprocessing, limit=4)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="none of the given images"):
        load_images(paths[:1], tiny_backbone.preprocessing)
