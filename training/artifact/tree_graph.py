"""Join a scikit-learn tree head to the backbone graph: one ONNX model.

skl2onnx converts the trees (``zipmap`` off, so probabilities are a float
tensor ``[N, C]``, not a sequence of maps); :func:`onnx.compose.merge_models`
wires the backbone's ``embeddings`` output into the trees' input; a few nodes
then turn the trees' probabilities into calibrated ones,
``softmax(log(max(p, eps)) / T)``, named ``probabilities``. Both parts use
opset :data:`~tlserve.training.features.onnx_trace.OPSET` and ``ai.onnx.ml`` 3 (the
``TreeEnsembleClassifier`` every onnxruntime since 1.x runs).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType

from tlserve.contract.rules import OUTPUT_EMBEDDINGS, OUTPUT_PROBABILITIES
from tlserve.training.fit.heads import TreeHead

__all__ = ["join_tree_head"]

ML_OPSET = 3
_PREFIX = "trees/"


def join_tree_head(
    backbone: onnx.ModelProto, head: TreeHead, *, opset: int, batch_axis: str
) -> onnx.ModelProto:
    """``backbone`` (images → embeddings) + ``head`` → (probabilities, embeddings)."""
    (embeddings,) = [o for o in backbone.graph.output if o.name == OUTPUT_EMBEDDINGS]
    dim = embeddings.type.tensor_type.shape.dim[1].dim_value
    with warnings.catch_warnings():
        # skl2onnx writes nodes_missing_value_tracks_true as Python bools into an
        # INTS attribute; protobuf 6 accepts them with this warning (the values are right).
        warnings.filterwarnings("ignore", message=r"Field onnx\.AttributeProto\.ints: Expected")
        trees = to_onnx(
            head.estimator,
            initial_types=[(OUTPUT_EMBEDDINGS, FloatTensorType([None, dim]))],
            target_opset={"": opset, "ai.onnx.ml": ML_OPSET},
            options={id(head.estimator): {"zipmap": False}},
        )
    trees.ir_version = backbone.ir_version
    trees = compose.add_prefix(trees, _PREFIX)
    merged = compose.merge_models(
        backbone,
        trees,
        io_map=[(OUTPUT_EMBEDDINGS, _PREFIX + OUTPUT_EMBEDDINGS)],
        outputs=[_PREFIX + OUTPUT_PROBABILITIES, OUTPUT_EMBEDDINGS],
    )
    graph = merged.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1e-7, dtype=np.float32), _PREFIX + "eps"),
            numpy_helper.from_array(
                np.array(1.0 / head.temperature, dtype=np.float32), _PREFIX + "inv_t"
            ),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Max", [_PREFIX + OUTPUT_PROBABILITIES, _PREFIX + "eps"], ["t_clip"]),
            helper.make_node("Log", ["t_clip"], ["t_log"]),
            helper.make_node("Mul", ["t_log", _PREFIX + "inv_t"], ["t_logits"]),
            helper.make_node("Softmax", ["t_logits"], [OUTPUT_PROBABILITIES], axis=-1),
        ]
    )
    kept = [o for o in graph.output if o.name == OUTPUT_EMBEDDINGS]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(
                OUTPUT_PROBABILITIES, TensorProto.FLOAT, [batch_axis, head.n_classes]
            ),
            *kept,
        ]
    )
    return merged
