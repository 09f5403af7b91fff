"""Input geometry chosen by measurement, and the exported model applies the one that won."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import ServerThread
from tests.training.shapes import TINY_BACKBONE
from tlserve.client import Client
from tlserve.contract.card import Preprocessing
from tlserve.training import train
from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.fit.strategies.geometry import (
    describe_geometry,
    geometry_candidates,
    source_side,
)

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
BAND = 12  # pixels of the 64 px image's border that carry the class


def test_candidates_are_the_whole_image_and_a_larger_size_only_with_the_pixels_for_it() -> None:
    native = Preprocessing(height=224, width=224, crop_pct=0.875)
    assert geometry_candidates(native, 300.0, "crop") == [dataclasses.replace(native, crop_pct=1)]
    assert geometry_candidates(dataclasses.replace(native, crop_pct=1.0), 300.0, "crop") == []
    (larger,) = geometry_candidates(native, 300.0, "size")  # 300 px scans: detail to see
    assert (larger.height, larger.width, larger.crop_pct) == (288, 288, 0.875)
    assert geometry_candidates(native, 28.0, "size") == []  # 28 px digits: upsampling only
    assert geometry_candidates(native, None, "size") == []
    assert describe_geometry(native) == "centre crop 0.875 at 224 px"
    assert describe_geometry(larger) == "centre crop 0.875 at 288 px"


def test_source_side_reads_the_median_shorter_side(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate([(300, 200), (400, 300), (320, 310), (10, 10)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size).save(path)
        paths.append(path)
    assert source_side(paths) == 250.0


def _write_border_classes(root: Path, per_class: int, seed: int) -> None:
    """64 px images: noise in the middle (the same for every class), the class in the border."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            image[:BAND], image[-BAND:] = colour, colour
            image[:, :BAND], image[:, -BAND:] = colour, colour
            Image.fromarray(image).save(folder / f"{i}.png")


@pytest.mark.slow
def test_the_whole_image_wins_when_the_class_is_in_the_border_and_the_server_applies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "border"
    _write_border_classes(data / "train", 15, seed=1)
    _write_border_classes(data / "test", 6, seed=2)

    def cropping_backbone(name: str, **kwargs: object) -> Backbone:
        # A backbone whose own geometry keeps only the middle half: the border is cut off.
        net = create_backbone(name, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(
            net, preprocessing=dataclasses.replace(net.preprocessing, crop_pct=0.5)
        )

    train_module = importlib.import_module("tlserve.training.train")
    monkeypatch.setattr(train_module, "create_backbone", cropping_backbone)
    repo = tmp_path / "models"
    result = train(
        data,
        model_repository=repo,
        name="border",
        strategy="auto",
        backbone=TINY_BACKBONE,
        workers=0,
        cache=False,
        time_budget=600,
        options={"trained": (), "trees": False},
    )
    assert result.card.preprocessing.crop_pct == 1.0
    assert result.params["geometry"] == "whole image at 64 px"
    rows = {c.name: c for c in result.candidates}
    crop, whole = (
        rows["linear, centre crop 0.5 at 64 px"],
        rows["linear, whole image at 64 px (adopted)"],
    )
    assert whole.val_accuracy > crop.val_accuracy + 0.2
    assert "Geometry" in result.reason
    assert result.test_accuracy is not None and result.test_accuracy >= 0.9

    # The server prepares images as the card says: what training measured.
    files = sorted((data / "test").rglob("*.png"))
    server = ServerThread(repo)
    try:
        with Client(server.target) as client:
            meta = client.model_metadata("border", timeout=10)
            assert meta.card is not None and meta.card.preprocessing.crop_pct == 1.0
            top = client.classify(files, model="border", top_k=1, timeout=30)
    finally:
        server.stop()
    served = [row[0].label for row in top]
    truth = [f.parent.name for f in files]
    assert np.mean([a == b for a, b in zip(served, truth, strict=True)]) >= 0.9
