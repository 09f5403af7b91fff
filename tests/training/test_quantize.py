"""Faster model variants: int8 quantization and float16, measured before publishing.

A tiny real convolutional classifier built with onnx.helper (it tells red,
green and blue images apart) stands in for an exported model; one test runs
the whole path on a model trained by ``tlserve train``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from tests.training.conv_model import (
    LABELS,
    SIZE,
    build_conv_classifier,
    colour_images,
    reference_for,
)
from tests.training.shapes import TINY_BACKBONE
from tlserve.cli.main import main
from tlserve.contract.card import ModelCard
from tlserve.contract.errors import InvalidInput
from tlserve.contract.variants import ReferenceSet, check_accuracy
from tlserve.training.artifact.fp16 import convert_fp16, gpu_providers
from tlserve.training.artifact.int8 import quantize_int8
from tlserve.training.artifact.quantize import build_variants
from tlserve.training.artifact.requantize import stratified
from tlserve.training.artifact.variants import (
    float_regions,
    name_nodes,
)
from tlserve.training.quantize_published import quantize_published
from tlserve.training.report.variant_section import VariantsRecord


@pytest.fixture
def conv_model(tmp_path: Path) -> Path:
    return build_conv_classifier(tmp_path / "model.onnx")


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _card(path: Path) -> ModelCard:
    card = ModelCard.from_props(_props(path))
    assert card is not None
    return card


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def _io(path: Path) -> list[tuple[str, str, list[object]]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [
        (a.name, a.type, list(a.shape)) for a in [*session.get_inputs(), *session.get_outputs()]
    ]


def test_int8_keeps_the_io_contract_the_card_and_unknown_outputs(conv_model: Path) -> None:
    target = conv_model.with_name("int8.onnx")
    quantize_int8(conv_model, target, colour_images(30).images)
    assert "QuantizeLinear" in _ops(target)  # the convolutions really are quantized
    assert _io(target) == _io(conv_model)  # including ood_score, which nothing here names
    assert _props(target) == _props(conv_model)  # the card and other tools' metadata
    images = colour_images(60, seed=5)
    float_run = ort.InferenceSession(str(conv_model)).run(None, {"images": images.images})
    int8_run = ort.InferenceSession(str(target)).run(None, {"images": images.images})
    assert (int8_run[0].argmax(1) == images.labels).all()
    np.testing.assert_allclose(int8_run[1], float_run[1], atol=0.05)


def test_normalisation_and_everything_after_the_last_conv_stay_float(conv_model: Path) -> None:
    model = onnx.load(str(conv_model))
    name_nodes(model)
    kept = {node.op_type for node in model.graph.node if node.name in float_regions(model)}
    assert kept == {"Cast", "Div", "Sub", "Transpose", "Relu", "GlobalAveragePool", "Flatten",
                    "MatMul", "Softmax", "ReduceMax", "Neg"}  # fmt: skip
    target = conv_model.with_name("int8.onnx")
    quantize_int8(conv_model, target, colour_images(30).images)
    quantized = onnx.load(str(target))
    producers = {out: node.op_type for node in quantized.graph.node for out in node.output}
    for node in quantized.graph.node:
        if node.op_type in ("Div", "Sub", "MatMul", "Softmax"):
            # Exact float inputs: straight from the previous float op or an initializer.
            assert all(producers.get(name) != "DequantizeLinear" for name in node.input), node
    # The normalisation's [1, 3, 1, 1] constants are spread to the image's shape (a fast
    # broadcast once onnxruntime runs it NHWC); nothing else changed shape.
    before = {i.name: list(i.dims) for i in model.graph.initializer}
    after = {i.name: list(i.dims) for i in quantized.graph.initializer if i.name in before}
    changed = {name for name in before if after.get(name, before[name]) != before[name]}
    normalisation = {
        name for node in model.graph.node if node.op_type in ("Sub", "Div")
        for name in node.input if before.get(name) == [1, 3, 1, 1]
    }  # fmt: skip
    assert changed == normalisation and normalisation
    assert all(after[name] == [1, 3, SIZE, SIZE] for name in changed)


def miscalibrated(variant: str, source: Path, target: Path, _: np.ndarray) -> None:
    """An int8 variant calibrated on black images only: real colours saturate."""
    quantize_int8(source, target, np.zeros((4, SIZE, SIZE, 3), np.uint8))


def test_auto_drops_a_variant_that_fails_the_reference_check(conv_model: Path) -> None:
    report = build_variants(
        conv_model, colour_images(30).images, reference_for(conv_model), colour_images(60, 5),
        seconds=0.02, maker=miscalibrated,
    )  # fmt: skip
    assert report is not None and report.published == ()
    assert all("dropped" in o.reason and "over the 0.5-point budget" in o.reason
               for o in report.outcomes)  # fmt: skip
    assert not conv_model.with_name("model.int8.onnx").exists()
    assert "QuantizeLinear" not in _ops(conv_model)  # model.onnx stays float32
    card = _card(conv_model)
    assert card.notes["variant"] == "float32" and card.notes["variants"] == ""
    assert card.metrics["float32_accuracy"] == 1.0
    assert card.metrics["int8_accuracy"] < 1.0  # both variants' figures are recorded
    assert {"int8_top1_agreement", "int8_images_per_second_b1"} <= set(card.metrics)
    assert card.notes["int8_reason"] == report.outcomes[0].reason


def test_auto_publishes_both_int8_encodings_beside_float32_when_they_pass(
    conv_model: Path,
) -> None:
    report = build_variants(
        conv_model, colour_images(30).images, reference_for(conv_model), colour_images(30, 5),
        seconds=0.02,
    )  # fmt: skip
    assert report is not None and report.published == ("int8", "int8-rr")
    assert "QuantizeLinear" not in _ops(conv_model)
    for variant in ("int8", "int8-rr"):
        path = conv_model.with_name(f"model.{variant}.onnx")
        assert "QuantizeLinear" in _ops(path) and _io(path) == _io(conv_model)
        assert _card(path).notes["variant"] == variant and _card(path).labels == LABELS
    assert _card(conv_model).notes["variants"] == "int8,int8-rr"
    assert _card(conv_model).notes["variant_budget_points"] == "0.5"
    assert VariantsRecord.from_report(report).to_dict()["published"] == ["int8", "int8-rr"]


def test_asking_for_int8_publishes_it_even_when_the_check_fails_here(conv_model: Path) -> None:
    report = build_variants(
        conv_model, colour_images(30).images, reference_for(conv_model), None,
        mode="int8", seconds=0.02, maker=miscalibrated,
    )  # fmt: skip
    assert report is not None and report.published == ("int8", "int8-rr")
    assert all("published as asked" in o.reason for o in report.outcomes)
    assert build_variants(conv_model, colour_images(3).images, reference_for(conv_model), None,
                          mode="none") is None  # fmt: skip


def test_a_check_on_too_few_images_cannot_pass() -> None:
    labels = np.arange(40) % 3
    reference = ReferenceSet(
        np.zeros((40, SIZE, SIZE, 3), np.uint8), labels, np.eye(3, dtype=np.float32)[labels], 40
    )
    check = check_accuracy(reference, labels.copy(), "int8")  # perfect agreement
    assert not check.passed and "40 images cannot show a 0.5-point budget (it needs 200)" in (
        check.reason
    )
    assert check_accuracy(reference, labels.copy(), "int8", budget_points=5.0).passed


def test_fp16_variant_runs_on_cpu_through_the_same_functions(conv_model: Path) -> None:
    target = conv_model.with_name("fp16.onnx")
    convert_fp16(conv_model, target)
    assert _io(target) == _io(conv_model) and _props(target) == _props(conv_model)
    weights = {t.name: t.data_type for t in onnx.load(str(target)).graph.initializer}
    assert weights["conv1"] == TensorProto.FLOAT16 and weights["head"] == TensorProto.FLOAT
    report = build_variants(
        conv_model, colour_images(3).images, reference_for(conv_model), colour_images(30, 3),
        mode="fp16", providers=["CPUExecutionProvider"], seconds=0.02,
    )  # fmt: skip
    assert report is not None and report.published == ("fp16",)
    outcome = report.outcomes[0]
    assert outcome.measured.candidate.accuracy == 1.0 and outcome.check.passed
    assert outcome.measured.provider == "CPUExecutionProvider"  # measured where it ran
    assert _card(conv_model.with_name("model.fp16.onnx")).notes["variant"] == "fp16"


@pytest.mark.gpu
def test_fp16_on_a_real_gpu(conv_model: Path) -> None:
    gpu = gpu_providers()
    report = build_variants(
        conv_model, colour_images(3).images, reference_for(conv_model), colour_images(30, 3),
        seconds=0.2,
    )  # fmt: skip
    assert report is not None and report.published == ("fp16",)
    assert report.outcomes[0].measured.provider in gpu


def test_gpu_providers_pick_fp16_only_where_a_gpu_provider_exists() -> None:
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu_providers(cuda) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert gpu_providers(["CPUExecutionProvider"]) == ()


def test_calibration_images_are_drawn_from_every_class() -> None:
    samples = [
        (Path(f"{label}-{i}.png"), label) for label in range(3) for i in range(50 * label + 5)
    ]
    picked = stratified(samples, 12, seed=1)
    assert len(picked) == 12
    assert sorted(p.name.split("-")[0] for p in picked) == ["0"] * 4 + ["1"] * 4 + ["2"] * 4
    assert stratified(samples, 12, seed=1) == picked  # reproducible


def _colour_folder(root: Path) -> Path:
    """train/ and test/ folders of PNGs of the three colours."""
    from PIL import Image

    for split, n, seed in (("train", 30, 0), ("test", 30, 7)):
        images = colour_images(n, seed)
        for i, (image, label) in enumerate(zip(images.images, images.labels, strict=True)):
            folder = root / split / LABELS[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_quantize_a_published_model_from_the_command_line(
    conv_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlserve.training.artifact.publish import publish

    data = _colour_folder(tmp_path / "colours")
    report = {"data": {"root": str(data)}, "name": "colours"}
    published = publish(
        conv_model, tmp_path / "models", "colours",
        {"report.json": json.dumps(report).encode(), "report.md": b"# report"},
    )  # fmt: skip
    code = main(["quantize", str(published), "--variant", "int8"])
    assert code == 0, capsys.readouterr().err
    version = tmp_path / "models" / "colours" / "2"
    card = _card(version / "model.onnx")
    assert card.notes["variant"] == "float32" and card.labels == LABELS
    assert card.notes["variants"] == "int8,int8-rr"
    assert card.metrics["int8_accuracy"] == 1.0  # 30 held-out PNGs from test/
    assert _io(version / "model.int8.onnx") == _io(conv_model)
    reference = ReferenceSet.load(version / "reference.npz")
    assert reference.held_out == 30 and len(reference.labels) == 60  # topped up from train/
    assert json.loads((version / "report.json").read_text())["variant"]["published"] == [
        "int8", "int8-rr"
    ]  # fmt: skip
    assert (version / "report.md").read_bytes() == b"# report"
    assert "int8" in capsys.readouterr().out
    old = tmp_path / "old" / "colours" / "1" / "model.onnx"
    old.parent.mkdir(parents=True)
    old.write_bytes((version / "model.int8.onnx").read_bytes())  # an older tlserve's layout
    with pytest.raises(InvalidInput, match="already the int8 variant"):
        quantize_published(old.parent)
    assert main(["quantize", str(tmp_path / "models" / "colours" / "9")]) == 1  # no model there


@pytest.mark.slow
def test_train_publishes_the_variants_beside_float32(shapes_folder: Path, tmp_path: Path) -> None:
    from tlserve.training import train

    repo = tmp_path / "models"
    result = train(
        shapes_folder, model_repository=repo, name="shapes", strategy="linear",
        backbone=TINY_BACKBONE, quantize="int8",
    )  # fmt: skip
    card = _card(result.model_path)
    assert card.notes["variant"] == "float32" and card.notes["variants"] == "int8,int8-rr"
    assert {"float32_accuracy", "int8_accuracy", "int8_top1_agreement"} <= set(card.metrics)
    assert (result.version_dir / "model.int8.onnx").is_file()
    assert (result.version_dir / "reference.npz").is_file()
    report = json.loads((result.version_dir / "report.json").read_text())
    assert report["variant"]["published"] == ["int8", "int8-rr"]
