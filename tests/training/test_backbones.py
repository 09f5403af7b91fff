"""The backbone registry, and that the shipped ImageNet weights are really right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skimage_data

from tests.training.shapes import TINY_BACKBONE, encode_png
from tlserve.contract.card import Preprocessing
from tlserve.contract.images import prepare_image
from tlserve.training.backbone.backbones import (
    create_backbone,
    create_imagenet_classifier,
    list_backbones,
)
from tlserve.training.backbone.efficientnet_lite import (
    LITE0_STAGE_DEPTHS,
    lite0_weights_file,
    remap_lukemelas_keys,
)
from tlserve.training.backbone.modules import ImageEmbedder

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_imagenet_classifier_sees_an_espresso_and_a_cat() -> None:
    """The remapped weights + their preprocessing, through THE prepare_image."""
    model, spec = create_imagenet_classifier("tf_efficientnet_lite0")
    assert spec == Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    photos = [skimage_data.coffee(), skimage_data.chelsea()]  # type: ignore[no-untyped-call]
    images = np.stack([prepare_image(encode_png(photo), spec) for photo in photos])
    # ImageEmbedder is the exported front end (uint8 NHWC → normalised NCHW → module);
    # in front of the full classifier its "embeddings" are the ImageNet logits.
    with torch.inference_mode():
        logits = ImageEmbedder(model, spec)(torch.from_numpy(images))
    top1 = logits.argmax(dim=1).tolist()
    assert top1[0] == ESPRESSO
    assert top1[1] in CATS
    assert float(torch.softmax(logits, dim=1)[0, ESPRESSO]) > 0.5


def test_lite0_backbone_gives_1280_dim_embeddings() -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    assert backbone.feature_dim == 1280
    assert not backbone.module.training
    with torch.inference_mode():
        out = backbone.module(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 1280)
    assert "tf_efficientnet_lite0" in list_backbones()


def test_remap_is_complete_and_wrong_depths_fail_loudly() -> None:
    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    remapped = remap_lukemelas_keys(state, LITE0_STAGE_DEPTHS)
    assert len(remapped) == len(state)
    assert "blocks.6.0.conv_pwl.weight" in remapped
    with pytest.raises(KeyError, match="beyond"):
        remap_lukemelas_keys(state, (1, 2, 2, 3, 3, 3, 1))


def test_timm_form_with_input_size() -> None:
    backbone = create_backbone(TINY_BACKBONE)
    assert backbone.name == TINY_BACKBONE
    assert (backbone.preprocessing.height, backbone.preprocessing.width) == (64, 64)
    assert create_backbone("timm:test_convnext@48x32").preprocessing.width == 32
    with torch.inference_mode():
        out = backbone.module(torch.zeros(3, 3, 64, 64))
    assert out.shape == (3, backbone.feature_dim)


def test_timm_form_loads_a_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_backbone(TINY_BACKBONE).module
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone(TINY_BACKBONE, weights=path).module
    for (name, a), (_, b) in zip(
        source.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet9000", "unknown backbone"),
        ("timm:not_a_model", "no model called"),
        ("timm:test_convnext@big", "malformed"),
    ],
)
def test_bad_backbone_names(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_backbone(name)


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_and_lite2_weights_from_their_packages(variant: int) -> None:
    name = f"tf_efficientnet_lite{variant}"
    model, spec = create_imagenet_classifier(name)
    assert (spec.height, spec.crop_pct) == ((240, 0.882) if variant == 1 else (260, 0.890))
    image = prepare_image(encode_png(skimage_data.coffee()), spec).copy()  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        logits = ImageEmbedder(model, spec)(torch.from_numpy(image[None]))
    assert int(logits.argmax()) == ESPRESSO
    backbone = create_backbone(name)
    assert backbone.feature_dim == 1280 and backbone.imagenet_head is not None


def test_torchvision_architecture_with_a_weights_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("tv:resnet18@96", weights=path)
    assert backbone.feature_dim == 512 and backbone.preprocessing.height == 96
    assert torch.equal(backbone.module.conv1.weight, source.conv1.weight)  # type: ignore[union-attr]
    with torch.inference_mode():
        assert backbone.module(torch.zeros(2, 3, 96, 96)).shape == (2, 512)
    with pytest.raises(ValueError, match="no classification model"):
        create_backbone("tv:not_a_model")


@pytest.mark.slow
def test_a_timm_model_with_a_conv_after_pooling_trains_and_exports(
    shapes_folder: Path, tmp_path: Path
) -> None:
    """MobileNetV3 pools 576 channels and widens them to 1024 in ``conv_head``:
    the head, the probe and the export must all use the 1024 it returns."""
    from tlserve.training import TrainConfig, train

    name = "timm:mobilenetv3_small_050@32"
    backbone = create_backbone(name)
    with torch.inference_mode():
        width = backbone.module(torch.zeros(1, 3, 32, 32)).shape[1]
    assert backbone.feature_dim == width == 1024
    result = train(
        TrainConfig(
            shapes_folder,
            model_repository=tmp_path / "models",
            name="mnv3",
            strategy="linear",
            backbone=name,
            cache_dir=tmp_path / "cache",
        )
    )
    assert result.model_path.is_file() and result.test_accuracy is not None
