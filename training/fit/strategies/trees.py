"""Frozen backbone + gradient-boosted trees (``trees``).

scikit-learn's :class:`HistGradientBoostingClassifier` on the cached
embeddings (of the last layer, or an earlier one), with early stopping on an
internal validation fraction. The fitted trees become a
:class:`~tlserve.training.fit.heads.TreeHead`, exported with skl2onnx and joined
to the backbone graph, so the model is still one ONNX file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from tlserve.training.backbone.layers import Layers, format_layer, parse_layer
from tlserve.training.data.folders import DataError
from tlserve.training.fit.heads import TreeHead, snap_thresholds
from tlserve.training.fit.strategies.base import FitContext, FittedHead, HeldOutLogits
from tlserve.training.fit.strategies.linear import cv_folds

__all__ = ["TreeProbe", "fit_trees", "out_of_fold_log_probabilities"]

log = logging.getLogger(__name__)


@dataclass
class TreeProbe:
    """Strategy ``trees``: gradient-boosted trees on frozen embeddings."""

    name: ClassVar[str] = "trees"
    max_iter: int = 200
    learning_rate: float = 0.1
    max_leaf_nodes: int = 15
    l2_regularization: float = 1.0
    layer: Layers | str = None

    folds: int = 5  # the folds the out-of-fold scores (and calibration logits) come from

    def fit(self, context: FitContext) -> FittedHead:
        fitted = self.fit_within(context, float("inf"))
        assert fitted is not None  # no limit: always fitted
        return fitted

    def fit_within(self, context: FitContext, seconds: float) -> FittedHead | None:
        """Fit; None when scoring out of fold (projected from one fit) needs over ``seconds``."""
        started = time.monotonic()
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
        folds = cv_folds(train.labels, self.folds, context.seed)
        one_fit = time.monotonic() - started
        if folds is not None and one_fit * folds.get_n_splits() > seconds - one_fit:
            log.info(
                "trees: one fit took %.1f s; %d folds would pass the budget", one_fit, self.folds
            )
            return None
        oof = out_of_fold_log_probabilities(head, train.embeddings, train.labels, folds)
        return FittedHead(
            head=head,
            embedder=context.embedder_for(layer),
            strategy=self.name,
            layer=layer,
            params=params,
            calibration=HeldOutLogits(oof, train.labels, "out-of-fold training logits")
            if oof is not None
            else None,
        )


def out_of_fold_log_probabilities(
    head: TreeHead, features: np.ndarray, labels: np.ndarray, folds: StratifiedKFold | None
) -> np.ndarray | None:
    """``log p`` ``[N, C]`` of each row from trees fitted on the other folds (None: no folds)."""
    if folds is None:
        return None
    probabilities = cross_val_predict(
        clone(head.estimator),
        features.astype(np.float32),
        labels,
        cv=folds,
        method="predict_proba",
    )
    logits: np.ndarray = np.log(np.clip(probabilities, 1e-7, None))
    return logits


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
