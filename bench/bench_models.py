"""The benchmark's models, each in its own one-model repository.

- ``lite0``: the demo's EfficientNet-Lite0 + linear head when ``make demo``
  left one (build/demo/models/fashion/1/model.onnx), else trained here on the
  shipped Fashion-MNIST sample through ``tlserve.training.train`` (a minute or two).
- ``lite0-96``: the same network and head trained at 96 px: about a
  millisecond per image on 2 cores, the overhead-bound case of a real network.
- ``fast``: a tiny convolutional net written with onnx.helper (64 px input,
  well under a millisecond per image), where serving overhead dominates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tlserve.contract.card import ModelCard, Preprocessing
from tlserve.contract.rules import CPU_PROVIDER

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "build" / "demo" / "models" / "fashion" / "1" / "model.onnx"


def lite0_model(out: Path) -> Path:
    """``<out>/lite0/lite0/1/model.onnx``: the real lite0 backbone with a linear head."""
    path = out / "lite0" / "lite0" / "1" / "model.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if DEMO_MODEL.is_file():
        shutil.copyfile(DEMO_MODEL, path)
        return path
    from tlserve.training import train

    staging = out / "lite0-train"
    train(
        ROOT / "examples" / "fashion-mnist", model_repository=staging, name="lite0",
        strategy="linear",
    )  # fmt: skip
    shutil.copyfile(sorted((staging / "lite0").glob("*/model.onnx"))[-1], path)
    return path


def small_model(out: Path) -> Path:
    """``<out>/lite0-96/lite0-96/1/model.onnx``: lite0 + linear head at 96 px."""
    path = out / "lite0-96" / "lite0-96" / "1" / "model.onnx"
    if path.is_file():
        return path
    from tlserve.training import train

    staging = out / "lite0-96-train"
    train(
        ROOT / "examples" / "fashion-mnist", model_repository=staging, name="lite0-96",
        strategy="linear", image_size=96,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sorted((staging / "lite0-96").glob("*/model.onnx"))[-1], path)
    return path


def fast_model(out: Path, size: int = 64, classes: int = 10) -> Path:
    """``<out>/fast/fast/1/model.onnx``: uint8 NHWC -> conv -> relu -> pool -> softmax."""
    import onnx
    from onnx import TensorProto, helper

    path = out / "fast" / "fast" / "1" / "model.onnx"
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    conv = rng.normal(0, 0.1, (16, 3, 3, 3)).astype(np.float32)
    dense = rng.normal(0, 0.1, (16, classes)).astype(np.float32)

    def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.flatten().tolist())

    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "scale"], ["x"]),
        helper.make_node("Conv", ["x", "conv"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["embeddings"]),
        helper.make_node("MatMul", ["embeddings", "dense"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fast",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 16]),
        ],
        initializer=[
            tensor("scale", np.array(255.0, np.float32)),
            tensor("conv", conv),
            tensor("dense", dense),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        labels=tuple(f"class-{i}" for i in range(classes)),
        preprocessing=Preprocessing(
            height=size, width=size, crop_pct=1.0, interpolation="bilinear"
        ),
        backbone="bench-fast-conv",
        strategy="random",
    )
    helper.set_model_props(model, card.to_props())
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def int8_model(float_path: Path) -> tuple[Path, dict[str, object]]:
    """The int8 variant of a bench model beside it, as model ``<name>-int8``, with its figures.

    Made by ``quantize_int8`` alone, not by the variant selection of
    ``tlserve train --quantize`` (whose rules are not what this bench
    measures). lite0 is calibrated on 256 of the Fashion-MNIST sample's
    training images and both variants are scored on its held-out ones; the
    fast model has random weights, so only its top-1 agreement means anything.
    """
    import hashlib
    import json

    from tlserve.training.artifact.int8 import quantize_int8

    name = float_path.parent.parent.name
    path = float_path.parent.parent.parent / f"{name}-int8" / "1" / "model.onnx"
    figures_file = path.with_name("figures.json")
    # Remade when the code that makes it changes (a stale variant would measure old code).
    made_by = hashlib.sha256(
        b"".join(
            f.read_bytes() for f in (ROOT / "training" / "artifact" / "int8.py", Path(__file__))
        )
    ).hexdigest()
    if path.is_file() and figures_file.is_file():
        cached = json.loads(figures_file.read_text())
        if cached.get("made_by") == made_by:
            return path, dict(cached)
    card = ModelCard.from_props(_props(float_path))
    assert card is not None
    calibration, images, labels = _images(name, card.preprocessing)
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_int8(float_path, path, calibration)
    answers = {v: _top1(p, images) for v, p in (("float32", float_path), ("int8", path))}
    accuracy = {
        v: float(np.mean(a == labels)) if labels is not None else None for v, a in answers.items()
    }
    figures = {
        "reason": f"quantize_int8, {len(calibration)} calibration images",
        "held_out": len(images),
        "agreement": float(np.mean(answers["float32"] == answers["int8"])),
        "variants": {v: {"accuracy": a} for v, a in accuracy.items()},
        "made_by": made_by,
    }
    figures_file.write_text(json.dumps(figures, indent=2))
    return path, figures


def _images(name: str, spec: Preprocessing) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Calibration images, scored images and their labels (None: random weights, no labels)."""
    if name not in ("lite0", "lite0-96"):
        rng = np.random.default_rng(0)
        shape = (64, spec.height, spec.width, 3)
        return rng.integers(0, 256, shape, np.uint8), rng.integers(0, 256, shape, np.uint8), None
    from tlserve.contract.images import prepare_image
    from tlserve.training.data.folders import load_dataset

    dataset = load_dataset(ROOT / "examples" / "fashion-mnist", seed=0)
    step = max(1, len(dataset.train) // 256)
    calibration = [prepare_image(p.read_bytes(), spec) for p, _ in dataset.train[::step][:256]]
    scored = dataset.test or dataset.val
    images = [prepare_image(p.read_bytes(), spec) for p, _ in scored]
    return np.stack(calibration), np.stack(images), np.array([label for _, label in scored])


def _top1(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[CPU_PROVIDER])
    chunks = [
        session.run(["probabilities"], {"images": images[i : i + 32]})[0]
        for i in range(0, len(images), 32)
    ]
    answers: np.ndarray = np.concatenate(chunks).argmax(axis=1)
    return answers


def _props(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
