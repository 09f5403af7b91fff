"""Export a classifier to ONNX, verify it, and publish it into a model repository.

The exported graph (docs/architecture.md "The artifact")::

    images  uint8 [batch, H, W, 3] RGB
      → cast, (x/255 - mean)/std, NHWC→NCHW   (inside the graph: runs on the GPU,
      → backbone → embeddings                   and the wire carries uint8)
      → head → softmax                          embeddings → Mahalanobis distance
    probabilities float32 [batch, C],  embeddings float32 [batch, D],
    ood_score float32 [batch]  (with an OodScorer: see tlserve.training.check.ood)

The exporter is torch's ``torch.export``-based one (``dynamo=True``), the
default since torch 2.9; the TorchScript exporter is deprecated and warns.
A model is verified before anyone can see it: ``onnx.checker`` (full check),
then onnxruntime on CPU against the PyTorch module on real images, at batch
sizes 1 and N, within the tolerances of :mod:`~tlserve.training.features.onnx_trace`
(and ``ood_score`` against its NumPy reference on the PyTorch embeddings
within :data:`~tlserve.training.check.ood.OOD_RTOL`).
:func:`publish` then moves it into ``<repository>/<name>/<version>/`` with
one atomic rename.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tlserve.contract.card import ModelCard
from tlserve.contract.errors import ExportError
from tlserve.contract.rules import (
    CPU_PROVIDER,
    INPUT_IMAGES,
    OUTPUT_EMBEDDINGS,
    OUTPUT_OOD_SCORE,
    OUTPUT_PROBABILITIES,
)
from tlserve.training.artifact.publish import publish
from tlserve.training.backbone.backbones import Backbone
from tlserve.training.backbone.modules import ImageClassifier, ImageEmbedder
from tlserve.training.check.ood import OodScorer, add_ood_output, compare_ood
from tlserve.training.features.onnx_trace import (
    BATCH_AXIS,
    EMBEDDING_ATOL,
    EMBEDDING_RTOL,
    OPSET,
    PROBABILITY_ATOL,
    embedding_excess,
    trace_to_onnx,
)
from tlserve.training.fit.heads import Head, TreeHead, head_logits, softmax

__all__ = [
    "OUTPUT_NAMES",
    "ExportCheck",
    "compare_outputs",
    "export_onnx",
    "publish",
]

log = logging.getLogger(__name__)

OUTPUT_NAMES = (OUTPUT_PROBABILITIES, OUTPUT_EMBEDDINGS)


@dataclass(frozen=True)
class ExportCheck:
    """How closely onnxruntime matched PyTorch (worst case over all checked batches)."""

    images: int
    probabilities_max_abs_diff: float
    embeddings_max_abs_diff: float
    embeddings_max_excess: float  # max(|a-b| - (atol + rtol*|b|)); <= 0 passes
    ood_score_max_rel_diff: float | None = None  # None: the model has no ood_score


def export_onnx(
    backbone: Backbone | ImageEmbedder,
    head: Head,
    card: ModelCard,
    path: Path,
    sample_images: np.ndarray,
    *,
    ood: OodScorer | None = None,
) -> ExportCheck:
    """Export ``backbone`` + ``head`` to ``path`` with ``card`` in its metadata, and verify it.

    ``sample_images`` are real images, uint8 ``[N, H, W, 3]`` prepared with the
    backbone's preprocessing (two or more, so both batch sizes are exercised).
    Raises :class:`ExportError` (with the figures) when verification fails,
    and then removes ``path``. Returns the figures of the check.

    A torch ``head`` is exported with the backbone in one trace; a
    :class:`~tlserve.training.fit.heads.TreeHead` is converted by skl2onnx and
    joined to the traced backbone (:mod:`~tlserve.training.artifact.tree_graph`), and
    checked against scikit-learn.

    With ``ood`` the graph gains the output ``ood_score`` and the card its
    threshold and how it was fitted (:meth:`OodScorer.on_card`).
    """
    embedder = (
        backbone if isinstance(backbone, ImageEmbedder) else ImageEmbedder.from_backbone(backbone)
    )
    embedder.eval()
    spec = embedder.preprocessing
    expected_shape = (spec.height, spec.width, 3)
    if (
        sample_images.dtype != np.uint8
        or sample_images.ndim != 4
        or sample_images.shape[1:] != expected_shape
    ):
        raise ValueError(
            f"sample_images must be uint8 [N, {spec.height}, {spec.width}, 3], got "
            f"{sample_images.dtype} {list(sample_images.shape)}"
        )
    if card.preprocessing != spec:
        raise ValueError(
            f"the card's preprocessing {card.preprocessing} is not the embedder's {spec}"
        )
    reference = _reference(embedder, head)
    if len(card.labels) != reference(sample_images[:1])[0].shape[1]:
        raise ValueError(
            f"the card has {len(card.labels)} labels but the head has a different number of outputs"
        )
    if isinstance(head, TreeHead):
        from tlserve.training.artifact.tree_graph import join_tree_head

        traced = trace_to_onnx(embedder, sample_images, (OUTPUT_EMBEDDINGS,))
        proto = join_tree_head(traced, head, opset=OPSET, batch_axis=BATCH_AXIS)
    else:
        proto = trace_to_onnx(ImageClassifier(embedder, head).eval(), sample_images, OUTPUT_NAMES)
    if ood is not None:
        add_ood_output(proto, ood, batch_axis=BATCH_AXIS)
        card = ood.on_card(card)
    for key, value in card.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "tlserve"
    path = Path(path)
    onnx.save_model(proto, str(path))
    try:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx checker rejected {path}: {exc}") from exc
        check = _verify(reference, path, sample_images, ood)
    except ExportError:
        path.unlink(missing_ok=True)  # an unverified model is not left lying around
        raise
    log.info(
        "exported %s (%.1f MB); onnxruntime vs torch on %d images: "
        "probabilities %.2e, embeddings %.2e",
        path,
        path.stat().st_size / 1e6,
        check.images,
        check.probabilities_max_abs_diff,
        check.embeddings_max_abs_diff,
    )
    return check


Reference = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _reference(embedder: ImageEmbedder, head: Head) -> Reference:
    """What the exported graph must compute, in PyTorch (+ scikit-learn for trees)."""

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            embeddings = embedder(torch.from_numpy(images.copy())).numpy()
        if isinstance(head, TreeHead):
            return softmax(head_logits(head, embeddings)).astype(np.float32), embeddings
        head.eval()
        with torch.inference_mode():
            logits = head(torch.from_numpy(embeddings))
            return torch.softmax(logits, dim=-1).numpy(), embeddings

    return run


def _verify(
    reference: Reference, path: Path, sample_images: np.ndarray, ood: OodScorer | None
) -> ExportCheck:
    session = ort.InferenceSession(str(path), providers=[CPU_PROVIDER])
    batches = [sample_images[:1], sample_images] if len(sample_images) > 1 else [sample_images]
    worst = ExportCheck(0, 0.0, 0.0, -np.inf, 0.0 if ood is not None else None)
    names = [*OUTPUT_NAMES, OUTPUT_OOD_SCORE] if ood is not None else list(OUTPUT_NAMES)
    for batch in batches:
        onnx_probabilities, onnx_embeddings, *onnx_ood = session.run(names, {INPUT_IMAGES: batch})
        expected = reference(batch)
        check = compare_outputs((onnx_probabilities, onnx_embeddings), expected)
        if ood is not None and worst.ood_score_max_rel_diff is not None:
            ood_diff = compare_ood(onnx_ood[0], ood.score(expected[1]))
            worst = dataclasses.replace(
                worst, ood_score_max_rel_diff=max(worst.ood_score_max_rel_diff, ood_diff)
            )
        worst = ExportCheck(
            images=max(worst.images, check.images),
            probabilities_max_abs_diff=max(
                worst.probabilities_max_abs_diff, check.probabilities_max_abs_diff
            ),
            embeddings_max_abs_diff=max(
                worst.embeddings_max_abs_diff, check.embeddings_max_abs_diff
            ),
            embeddings_max_excess=max(worst.embeddings_max_excess, check.embeddings_max_excess),
            ood_score_max_rel_diff=worst.ood_score_max_rel_diff,
        )
    return worst


def compare_outputs(
    onnx_outputs: tuple[np.ndarray, np.ndarray], torch_outputs: tuple[np.ndarray, np.ndarray]
) -> ExportCheck:
    """Compare (probabilities, embeddings) pairs; raise :class:`ExportError` past the tolerances."""
    (onnx_p, onnx_e), (torch_p, torch_e) = onnx_outputs, torch_outputs
    if onnx_p.shape != torch_p.shape or onnx_e.shape != torch_e.shape:
        raise ExportError(
            f"output shapes differ: onnxruntime {onnx_p.shape}, {onnx_e.shape} vs "
            f"torch {torch_p.shape}, {torch_e.shape}"
        )
    p_diff = float(np.max(np.abs(onnx_p - torch_p)))
    e_excess = embedding_excess(onnx_e, torch_e)
    check = ExportCheck(len(onnx_p), p_diff, float(np.max(np.abs(onnx_e - torch_e))), e_excess)
    if not (p_diff <= PROBABILITY_ATOL and e_excess <= 0.0):  # also catches NaN
        raise ExportError(
            f"onnxruntime disagrees with torch on {check.images} images: "
            f"probabilities max abs diff {p_diff:.3g} (limit {PROBABILITY_ATOL:g}); "
            f"embeddings max abs diff {check.embeddings_max_abs_diff:.3g} "
            f"(limit atol {EMBEDDING_ATOL:g} + rtol {EMBEDDING_RTOL:g} x |torch|)"
        )
    return check
