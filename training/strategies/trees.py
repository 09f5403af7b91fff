"""Frozen backbone + gradient-boosted trees (``trees``).

scikit-learn's :class:`HistGradientBoostingClassifier` on the cached
embeddings (of the last layer, or an earlier one), with early stopping on an
internal validation fraction. The fitted trees become a
:class:`~tlserve.training.heads.TreeHead`, exported with skl2onnx and joined
to the backbone graph, so the model is still one ONNX file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from tlserve.training.data import DataError
from tlserve.training.heads import TreeHead, snap_thresholds
from tlserve.training.layers import Layer, format_layer, parse_layer
from tlserve.training.strategies.base import FitContext, FittedHead

__all__ = ["TreeProbe", "fit_trees"]

log = logging.getLogger(__name__)


@dataclass
class TreeProbe:
    """Strategy ``trees``: gradient-boosted trees on frozen embeddings."""

    name: ClassVar[str] = "trees"
    max_iter: int = 200
    learning_rate: float = 0.1
    max_leaf_nodes: int = 15
    l2_regularization: float = 1.0
    layer: Layer | str = None

    def fit(self, context: FitContext) -> FittedHead:
        layer = parse_layer(self.layer)
        train = context.features("train", layer)
        head, score = fit_trees(
            train.embeddings,
            train.labels,
            classes=context.classes,
            seed=context.seed,
            balanced=context.balanced,
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            max_leaf_nodes=self.max_leaf_nodes,
            l2_regularization=self.l2_regularization,
        )
        params: dict[str, float | int | str] = {
            "layer": format_layer(layer),
            "iterations": int(head.estimator.n_iter_),
            "learning_rate": self.learning_rate,
            "max_leaf_nodes": self.max_leaf_nodes,
        }
        if score is not None:
            params["early_stopping_accuracy"] = round(score, 6)
        extra: dict[str, object] = {}
        folds = min(3, int(np.bincount(train.labels).min()))
        if folds >= 2:
            probabilities = cross_val_predict(
                clone(head.estimator),
                train.embeddings,
                train.labels,
                cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=context.seed),
                method="predict_proba",
            )
            extra["calibration"] = (np.log(np.clip(probabilities, 1e-7, None)), train.labels)
            extra["calibration_source"] = "out-of-fold training logits"
        embedder = context.embedder_for(layer)
        return FittedHead(head=head, embedder=embedder, layer=layer, params=params, extra=extra)


def fit_trees(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    classes: tuple[str, ...],
    seed: int = 0,
    balanced: bool = False,
    max_iter: int = 200,
    learning_rate: float = 0.1,
    max_leaf_nodes: int = 15,
    l2_regularization: float = 1.0,
) -> tuple[TreeHead, float | None]:
    """Fit the trees; return the head and the early-stopping validation accuracy."""
    counts = np.bincount(labels, minlength=len(classes))
    missing = [classes[int(i)] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(f"no readable training images for class(es): {', '.join(missing)}")
    # Early stopping needs a few images of each class in its validation slice.
    early = int(counts.min()) >= 10
    estimator = HistGradientBoostingClassifier(
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_leaf_nodes=max_leaf_nodes,
        # scikit-learn's default (20) leaves tiny datasets with single-leaf trees.
        min_samples_leaf=max(2, min(20, len(labels) // (4 * len(classes)))),
        l2_regularization=l2_regularization,
        early_stopping=early,
        validation_fraction=0.15 if early else None,
        n_iter_no_change=15,
        scoring="accuracy",
        class_weight="balanced" if balanced else None,
        random_state=seed,
    )
    estimator.fit(features.astype(np.float32), labels)
    snap_thresholds(estimator)
    score = float(estimator.validation_score_[-1]) if early else None
    log.info(
        "trees: %d iterations%s",
        estimator.n_iter_,
        f", early-stopping accuracy {score:.4f}" if score is not None else "",
    )
    return TreeHead(estimator, len(classes)), score
