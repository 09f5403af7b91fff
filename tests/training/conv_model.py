"""A tiny real convolutional classifier (it tells red, green and blue images apart),
the images it classifies, and a reference set of them: the stand-in for an
exported model in the variant tests of training and server alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tlserve.contract.card import ModelCard, Preprocessing
from tlserve.contract.variants import ReferenceSet
from tlserve.training.artifact.variants import HeldOut, load_session, probabilities

__all__ = ["COLOURS", "LABELS", "SIZE", "build_conv_classifier", "colour_images", "reference_for"]

SIZE = 16
LABELS = ("a-red", "b-green", "c-blue")  # sorted, as folder names are
COLOURS = ((210, 40, 40), (40, 200, 50), (40, 60, 220))


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.flatten().tolist())


def build_conv_classifier(path: Path) -> Path:
    """uint8 NHWC -> normalise -> 2 convs -> pool -> embeddings -> head; plus an ood_score."""
    rng = np.random.default_rng(0)
    conv1 = rng.normal(0, 0.05, (8, 3, 3, 3)).astype(np.float32)
    for c in range(8):
        conv1[c, c % 3, 1, 1] += 1.0  # channel c follows input colour c % 3
    conv2 = rng.normal(0, 0.05, (8, 8, 3, 3)).astype(np.float32)
    for c in range(8):
        conv2[c, c, 1, 1] += 1.0
    head = np.zeros((8, 3), np.float32)
    for c in range(8):
        head[c, c % 3] = 8.0
    nodes = [
        # The order tlserve's export has: NCHW first, then per-channel normalisation.
        helper.make_node("Transpose", ["images"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "scale"], ["unit"]),
        helper.make_node("Sub", ["unit", "mean"], ["x"]),
        helper.make_node("Conv", ["x", "conv1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embeddings"]),
        helper.make_node("MatMul", ["embeddings", "head"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        # An output this code knows nothing about must survive untouched.
        helper.make_node("ReduceMax", ["logits"], ["top"], axes=[1], keepdims=0),
        helper.make_node("Neg", ["top"], ["ood_score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            _tensor("scale", np.array(255.0, np.float32)),
            _tensor("mean", np.array([0.5, 0.45, 0.4], np.float32).reshape(1, 3, 1, 1)),
            _tensor("conv1", conv1),
            _tensor("conv2", conv2),
            _tensor("head", head),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        labels=LABELS,
        preprocessing=Preprocessing(height=SIZE, width=SIZE, crop_pct=1.0),
        backbone="two-convs",
        strategy="fixture",
        metrics={"test_accuracy": 1.0},
        notes={"seed": "0"},
    )
    helper.set_model_props(model, {**card.to_props(), "other.tool": "kept"})
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def colour_images(n: int, seed: int = 0) -> HeldOut:
    """``n`` noisy images of the three colours, labelled with the colour's index."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = np.asarray(COLOURS, np.int16)[labels][:, None, None, :]
    noise = rng.integers(-30, 31, (n, SIZE, SIZE, 3))
    return HeldOut(np.clip(base + noise, 0, 255).astype(np.uint8), labels.astype(np.int64))


def reference_for(model: Path, n: int = 240, seed: int = 3) -> ReferenceSet:
    """``n`` labelled colour images with ``model``'s probabilities: a reference set."""
    images = colour_images(n, seed)
    answers = probabilities(load_session(model), images.images)
    return ReferenceSet(images.images, images.labels, answers, held_out=n)
