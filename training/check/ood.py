"""An out-of-distribution score inside every model: how unlike the training data an image is.

Fitted at export on the training embeddings, scaled to unit length: one
Gaussian per class with a shared covariance (Ledoit-Wolf shrunk, since a few
hundred images cannot estimate a 1280 x 1280 covariance), and the score is
the Mahalanobis distance to the nearest class mean::

    u = x / ‖x‖,  z = u · W     (W = V Λ^-½ whitens: Σ⁻¹ = W Wᵀ)
    ood_score = sqrt(min_c ‖z - μ_c W‖²)

Chosen by measurement (``make bench-ood``) over a k-nearest-neighbour cosine
distance and over the same Gaussians on raw embeddings: on the example data
all three separate natural photos perfectly, and on MNIST digits (a harder,
also greyscale, set) unit-length Mahalanobis did best. The
computation is appended to the exported graph as the output ``ood_score``
float32 ``[N]``; :meth:`OodScorer.score` is its NumPy reference. The
threshold is a percentile of the scores of held-out in-distribution images;
an image above it is flagged ``out_of_distribution``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from tlserve.contract.card import ModelCard, Preprocessing
from tlserve.contract.errors import ExportError
from tlserve.contract.images import prepare_decoded
from tlserve.contract.predictions import OOD_THRESHOLD_METRIC
from tlserve.contract.rules import OUTPUT_EMBEDDINGS, OUTPUT_OOD_SCORE
from tlserve.training.features.extract import Features, extract_features
from tlserve.training.fit.strategies.base import FitContext, FittedHead

__all__ = [
    "METHOD",
    "OOD_PERCENTILE",
    "OOD_REFERENCE_SET",
    "OOD_RTOL",
    "OodScorer",
    "add_ood_output",
    "compare_ood",
    "fit_for_model",
    "fit_ood",
    "knn_distance",
    "ood_auroc",
    "reference_ood_images",
]

log = logging.getLogger(__name__)

METHOD = "mahalanobis-shared-covariance"
#: Held-out in-distribution images scoring above the threshold: 1 in 100.
OOD_PERCENTILE = 99.0
OOD_REFERENCE_SET = "scikit-image sample photos (18 photos x 5 crops)"
_PREFIX = "ood/"
# The score whitens the embeddings, which magnifies their ~1e-5 export
# differences along low-variance directions; observed relative ones are ~1e-5.
OOD_RTOL = 1e-3
_EPS = 1e-12  # a zero embedding stays zero instead of dividing by zero


@dataclass(frozen=True)
class OodScorer:
    """A fitted Mahalanobis scorer: whitening ``W`` ``[D, D]``, whitened class means ``[C, D]``.

    ``threshold`` (None until :meth:`with_threshold`) and ``auroc`` (None
    when not measured) go into the model card.
    """

    whitening: np.ndarray
    centres: np.ndarray
    threshold: float | None = None
    auroc: float | None = None
    n_fitted: int = 0
    n_threshold: int = 0

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """The NumPy reference of the graph's ``ood_score``: float64 ``[N]``."""
        z = _unit(np.asarray(embeddings, np.float64)) @ self.whitening.astype(np.float64)
        d2 = ((z[:, None, :] - self.centres.astype(np.float64)[None, :, :]) ** 2).sum(axis=2)
        result: np.ndarray = np.sqrt(d2.min(axis=1))
        return result

    def with_threshold(self, held_out: np.ndarray, percentile: float = OOD_PERCENTILE) -> OodScorer:
        """The threshold set at ``percentile`` of the held-out in-distribution scores."""
        scores = self.score(held_out)
        threshold = float(np.percentile(scores, percentile)) if len(scores) else None
        return dataclasses.replace(self, threshold=threshold, n_threshold=len(scores))

    def card_entries(self) -> tuple[dict[str, float], dict[str, str]]:
        """Metrics and notes for the model card (threshold, AUROC, how it was fitted)."""
        metrics: dict[str, float] = {}
        if self.threshold is not None:
            metrics[OOD_THRESHOLD_METRIC] = self.threshold
        if self.auroc is not None:
            metrics["ood_auroc"] = self.auroc
        notes = {
            "ood_method": METHOD,
            "ood_fitted_on": f"{self.n_fitted} training embeddings, {len(self.centres)} classes",
            "ood_threshold_rule": (
                f"{OOD_PERCENTILE:g}th percentile of {self.n_threshold} held-out images"
            ),
        }
        if self.auroc is not None:
            notes["ood_auroc_against"] = OOD_REFERENCE_SET
        return metrics, notes

    def on_card(self, card: ModelCard) -> ModelCard:
        """``card`` with this scorer's metrics and notes added."""
        metrics, notes = self.card_entries()
        return dataclasses.replace(
            card, metrics={**card.metrics, **metrics}, notes={**card.notes, **notes}
        )


def fit_ood(embeddings: np.ndarray, labels: np.ndarray) -> OodScorer:
    """Class means and one shrunk shared covariance of the training embeddings."""
    x = _unit(np.asarray(embeddings, np.float64))
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    values, vectors = np.linalg.eigh(covariance)
    whitening = vectors / np.sqrt(np.maximum(values, 1e-12 * values.max()))
    return OodScorer(
        whitening=whitening.astype(np.float32),
        centres=(means @ whitening).astype(np.float32),
        n_fitted=len(x),
    )


def _unit(x: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
    return scaled


def knn_distance(train: np.ndarray, queries: np.ndarray, k: int = 5) -> np.ndarray:
    """The alternative measured against Mahalanobis: 1 - cosine to the ``k``-th nearest."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = q @ a.T
    kth: np.ndarray = np.sort(similarity, axis=1)[:, -k]
    return 1.0 - kth


def ood_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling out-of-distribution (positive) from in-distribution by the score."""
    truth = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(truth, np.r_[in_scores, out_scores]))


def add_ood_output(proto: onnx.ModelProto, scorer: OodScorer, *, batch_axis: str) -> None:
    """Append ``ood_score`` float32 ``[N]``, computed from ``embeddings``, to ``proto`` in place.

    Plain ONNX ops (ReduceL2, Div, MatMul, Sub, ReduceSum, ReduceMin, Sqrt), so
    onnxruntime's optimisers and int8 quantisation treat it like any output.
    """
    graph = proto.graph
    if OUTPUT_EMBEDDINGS not in {o.name for o in graph.output}:
        raise ValueError(f"the graph has no {OUTPUT_EMBEDDINGS!r} output to score")
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    p = _PREFIX
    graph.initializer.extend(
        [
            numpy_helper.from_array(scorer.whitening.astype(np.float32), p + "whitening"),
            numpy_helper.from_array(scorer.centres.astype(np.float32), p + "centres"),
            numpy_helper.from_array(np.array([1], np.int64), p + "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), p + "axis2"),
            numpy_helper.from_array(np.array(_EPS, np.float32), p + "eps"),
        ]
    )
    graph.node.extend(
        [
            _reduce("ReduceL2", OUTPUT_EMBEDDINGS, 1, p + "norm", opset, keepdims=1),
            helper.make_node("Max", [p + "norm", p + "eps"], [p + "norm_eps"]),
            helper.make_node("Div", [OUTPUT_EMBEDDINGS, p + "norm_eps"], [p + "unit"]),
            helper.make_node("MatMul", [p + "unit", p + "whitening"], [p + "z"]),
            helper.make_node("Unsqueeze", [p + "z", p + "axis1"], [p + "z3"]),  # [N, 1, D]
            helper.make_node("Sub", [p + "z3", p + "centres"], [p + "diff"]),  # [N, C, D]
            helper.make_node("Mul", [p + "diff", p + "diff"], [p + "sq"]),
            _reduce("ReduceSum", p + "sq", 2, p + "d2", opset, keepdims=0),
            _reduce("ReduceMin", p + "d2", 1, p + "min", opset, keepdims=0),
            helper.make_node("Sqrt", [p + "min"], [OUTPUT_OOD_SCORE]),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(OUTPUT_OOD_SCORE, TensorProto.FLOAT, [batch_axis])
    )


def _reduce(op: str, x: str, axis: int, out: str, opset: int, *, keepdims: int) -> onnx.NodeProto:
    """A reduction over ``axis``: its axes became an input in opset 18 (ReduceSum's in 13)."""
    if opset >= (13 if op == "ReduceSum" else 18):
        return helper.make_node(op, [x, f"{_PREFIX}axis{axis}"], [out], keepdims=keepdims)
    return helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims)


def compare_ood(onnx_scores: np.ndarray, reference: np.ndarray) -> float:
    """Max relative difference of ``ood_score`` from its reference; ExportError past OOD_RTOL."""
    if onnx_scores.shape != reference.shape or onnx_scores.dtype != np.float32:
        raise ExportError(
            f"ood_score is {onnx_scores.dtype} {list(onnx_scores.shape)}, "
            f"expected float32 {list(reference.shape)}"
        )
    diff = float(np.max(np.abs(onnx_scores - reference) / np.maximum(np.abs(reference), 1e-6)))
    if not diff <= OOD_RTOL:  # also catches NaN
        raise ExportError(
            f"onnxruntime's ood_score differs from its NumPy reference by {diff:.3g} "
            f"(relative; limit {OOD_RTOL:g})"
        )
    return diff


# The natural photos scikit-image ships inside its wheel (no download).
_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "rocket", "text", "retina", "brick",
    "grass", "gravel", "cell", "clock", "colorwheel",
)  # fmt: skip


def _crops(image: Image.Image) -> Iterator[Image.Image]:
    """The whole photo and its four quarter-overlapping corners: 5 views of it."""
    width, height = image.size
    yield image
    w, h = width * 3 // 5, height * 3 // 5
    for left, top in ((0, 0), (width - w, 0), (0, height - h), (width - w, height - h)):
        yield image.crop((left, top, left + w, top + h))


def reference_ood_images(spec: Preprocessing) -> np.ndarray | None:
    """:data:`OOD_REFERENCE_SET` as the model's uint8 input, or None without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        return None
    rows: list[np.ndarray] = []
    for name in _PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        rows.extend(prepare_decoded(view, spec) for view in _crops(Image.fromarray(array)))
    return np.stack(rows)


def fit_for_model(context: FitContext, fitted: FittedHead) -> OodScorer:
    """The scorer a trained model exports: fitted, thresholded and measured.

    Fitted on the training embeddings of the embedder being exported; the
    threshold is :data:`OOD_PERCENTILE` of the held-out (val and test)
    images' scores (of the training images' when none is held out); AUROC
    against :data:`OOD_REFERENCE_SET` when scikit-image is installed.
    """

    def embedded(split: str) -> Features | None:
        samples = context.splits.get(split, [])
        if not samples:
            return None
        if not fitted.trained_backbone:  # frozen: the features training used, cached
            return context.features(split, fitted.layer)
        return extract_features(
            fitted.embedder, samples, batch_size=context.batch_size, workers=context.workers
        )

    train = embedded("train")
    if train is None or not len(train.labels):
        raise ValueError("no training embeddings to fit the out-of-distribution score on")
    scorer = fit_ood(train.embeddings, train.labels)
    held = [f.embeddings for f in map(embedded, ("val", "test")) if f is not None]
    held_out = np.concatenate(held) if held and sum(map(len, held)) else train.embeddings
    scorer = scorer.with_threshold(held_out)
    photos = reference_ood_images(fitted.embedder.preprocessing)
    if photos is not None:
        fitted.embedder.eval()
        with torch.inference_mode():
            outside = fitted.embedder(torch.from_numpy(photos)).numpy()
        scorer = dataclasses.replace(
            scorer, auroc=ood_auroc(scorer.score(held_out), scorer.score(outside))
        )
    log.info(
        "ood_score: threshold %.4g on %d held-out images, AUROC %s vs %s",
        scorer.threshold, scorer.n_threshold,
        "n/a" if scorer.auroc is None else f"{scorer.auroc:.4f}", OOD_REFERENCE_SET,
    )  # fmt: skip
    return scorer
