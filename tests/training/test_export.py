"""ONNX export (parity, metadata, dynamic batch) and atomic publishing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.training.shapes import TINY_BACKBONE, write_shapes
from tlserve.contract.card import ModelCard
from tlserve.contract.errors import ExportError, InvalidInput
from tlserve.training.artifact.export import ExportCheck, compare_outputs, export_onnx
from tlserve.training.artifact.publish import publish
from tlserve.training.backbone.backbones import Backbone, create_backbone
from tlserve.training.backbone.modules import ImageClassifier, ImageEmbedder
from tlserve.training.features.extract import load_images
from tlserve.training.features.onnx_trace import PROBABILITY_ATOL

LABELS = ("circle", "square", "triangle")


@dataclasses.dataclass(frozen=True)
class Exported:
    path: Path
    backbone: Backbone
    head: torch.nn.Module
    card: ModelCard
    images: np.ndarray
    check: ExportCheck


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """One real export of a tiny random timm model, shared by the tests below."""
    root = tmp_path_factory.mktemp("export")
    write_shapes(root / "images", 4)
    torch.manual_seed(0)
    backbone = create_backbone(TINY_BACKBONE)
    head = torch.nn.Linear(backbone.feature_dim, len(LABELS)).eval()
    card = ModelCard(
        labels=LABELS,
        preprocessing=backbone.preprocessing,
        backbone=backbone.name,
        strategy="linear",
        metrics={"test_accuracy": 0.5},
        notes={"C": "0.1"},
    )
    images = load_images(sorted((root / "images").rglob("*.png")), card.preprocessing, limit=12)
    path = root / "model.onnx"
    check = export_onnx(backbone, head, card, path, images[:4])
    return Exported(path, backbone, head, card, images, check)


def test_graph_signature_is_the_contract(exported: Exported) -> None:
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model, full_check=True)
    (images,) = model.graph.input
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    assert dims == ["batch", 64, 64, 3]
    outputs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert outputs == {
        "probabilities": ["batch", 3],
        "embeddings": ["batch", exported.backbone.feature_dim],
    }
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output} == {
        "probabilities": onnx.TensorProto.FLOAT,
        "embeddings": onnx.TensorProto.FLOAT,
    }
    assert model.opset_import[0].version in (17, 18)


def test_card_round_trips_through_metadata_props(exported: Exported) -> None:
    model = onnx.load(str(exported.path))
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelCard.from_props(props) == exported.card
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert ModelCard.from_props(session.get_modelmeta().custom_metadata_map) == exported.card


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_onnxruntime_matches_torch_at_any_batch_size(exported: Exported, batch: int) -> None:
    images = exported.images[:batch]
    assert len(images) == batch
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    probabilities, embeddings = session.run(["probabilities", "embeddings"], {"images": images})
    model = ImageClassifier(ImageEmbedder.from_backbone(exported.backbone), exported.head)
    with torch.inference_mode():
        expected_p, expected_e = model(torch.from_numpy(images.copy()))
    assert probabilities.shape == (batch, 3) and embeddings.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected_p.numpy(), atol=PROBABILITY_ATOL)
    np.testing.assert_allclose(embeddings, expected_e.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The embeddings vary between images: the comparison above is not vacuous.
    assert float(np.abs(np.diff(embeddings, axis=0)).max(initial=1.0)) > 1e-2


def test_export_reports_its_check(exported: Exported) -> None:
    assert exported.check.images == 4
    assert exported.check.probabilities_max_abs_diff <= PROBABILITY_ATOL
    assert exported.check.embeddings_max_excess <= 0


def test_parity_failure_raises_with_the_figures() -> None:
    p = np.full((2, 3), 1 / 3, dtype=np.float32)
    e = np.ones((2, 4), dtype=np.float32)
    compare_outputs((p, e), (p + 1e-6, e + 1e-5))
    with pytest.raises(ExportError, match=r"probabilities max abs diff 0\.01"):
        compare_outputs((p + 0.01, e), (p, e))
    with pytest.raises(ExportError, match=r"embeddings max abs diff 0\.5"):
        compare_outputs((p, e + 0.5), (p, e))
    with pytest.raises(ExportError):
        compare_outputs((p * np.nan, e), (p, e))


def test_failed_verification_leaves_no_model(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tlserve.training.artifact.export.PROBABILITY_ATOL", -1.0)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="onnxruntime disagrees with torch on 1 images"):
        export_onnx(exported.backbone, exported.head, exported.card, path, exported.images[:2])
    assert not path.exists()


def test_export_refuses_inputs_that_break_the_contract(exported: Exported, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="uint8"):
        export_onnx(
            exported.backbone,
            exported.head,
            exported.card,
            path,
            exported.images.astype(np.float32),
        )
    other = dataclasses.replace(
        exported.card, preprocessing=dataclasses.replace(exported.card.preprocessing, crop_pct=1.0)
    )
    with pytest.raises(ValueError, match="preprocessing"):
        export_onnx(exported.backbone, exported.head, other, path, exported.images)
    fewer = dataclasses.replace(exported.card, labels=("a", "b"))
    with pytest.raises(ValueError, match="2 labels"):
        export_onnx(exported.backbone, exported.head, fewer, path, exported.images)
    assert not path.exists()


def test_publish_versions_atomically(tmp_path: Path) -> None:
    model_file = tmp_path / "built.onnx"
    model_file.write_bytes(b"onnx bytes")
    repo = tmp_path / "repo"
    first = publish(model_file, repo, "shapes", {"report.json": b"{}"})
    second = publish(model_file, repo, "shapes", {})
    assert first == repo / "shapes" / "1" and second == repo / "shapes" / "2"
    assert (first / "model.onnx").read_bytes() == b"onnx bytes"
    assert sorted(p.name for p in first.iterdir()) == ["model.onnx", "report.json"]
    assert sorted(p.name for p in (repo / "shapes").iterdir()) == ["1", "2"]  # no .tmp-*
    (repo / "shapes" / "9").mkdir()
    (repo / "shapes" / "notes").mkdir()
    assert publish(model_file, repo, "shapes").name == "10"


def test_publish_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        publish(tmp_path / "missing.onnx", tmp_path / "repo", "shapes")
    assert list((tmp_path / "repo" / "shapes").iterdir()) == []


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../evil", "a/b", ".hidden", "a b", "x" * 129, "a..b", "ünï"]
)
def test_publish_rejects_bad_names(tmp_path: Path, name: str) -> None:
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"x")
    with pytest.raises(InvalidInput, match="not a valid model name"):
        publish(model_file, tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()


def test_publish_rejects_bad_extra_file_names(tmp_path: Path) -> None:
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"x")
    for filename in ("model.onnx", "../x", "sub/x"):
        with pytest.raises(InvalidInput, match="extra file"):
            publish(model_file, tmp_path / "repo", "ok", {filename: b""})
