"""Frozen backbone + multinomial logistic regression (the "small data, like ImageNet" case).

Features are standardised and fed to scikit-learn's ``LogisticRegression``;
the regularisation strength ``C`` is picked from a small grid by stratified
k-fold cross-validation on the training features. The fitted scaler and
regression are then folded into one ``torch.nn.Linear``::

    logits = W · (x - mean) / scale + b  =  (W / scale) · x + (b - W · mean / scale)

so the exported head is a single Gemm, with no scikit-learn at serving time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tlserve.training.data import DataError
from tlserve.training.layers import Layer, format_layer, parse_layer
from tlserve.training.strategies.base import FitContext, FittedHead

__all__ = [
    "DEFAULT_C_GRID",
    "LinearFit",
    "LinearProbe",
    "fit_logistic_regression",
    "fold_into_linear",
]

log = logging.getLogger(__name__)

DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass(frozen=True)
class LinearFit:
    """The fitted head and how it was chosen (``cv_accuracy`` is None without CV)."""

    linear: torch.nn.Linear
    c: float
    cv_accuracy: float | None
    folds: int
    n_iter: int


@dataclass
class LinearProbe:
    """Strategy ``linear``: logistic regression on frozen embeddings.

    ``layer`` (``None``: the last, else e.g. ``-2``) picks the features
    (:mod:`~tlserve.training.layers`).
    """

    name: ClassVar[str] = "linear"
    c_grid: Sequence[float] = DEFAULT_C_GRID
    folds: int = 5
    max_iter: int = 1000
    layer: Layer | str = None

    def fit(self, context: FitContext) -> FittedHead:
        layer = parse_layer(self.layer)
        train = context.features("train", layer)
        fit = fit_logistic_regression(
            train.embeddings,
            train.labels,
            classes=context.classes,
            c_grid=self.c_grid,
            folds=self.folds,
            seed=context.seed,
            max_iter=self.max_iter,
            balanced=context.balanced,
        )
        params: dict[str, float | int | str] = {
            "C": fit.c,
            "folds": fit.folds,
            "layer": format_layer(layer),
        }
        if fit.cv_accuracy is not None:
            params["cv_accuracy"] = round(fit.cv_accuracy, 6)
        oof = out_of_fold_logits(
            train.embeddings,
            train.labels,
            c=fit.c,
            folds=fit.folds,
            seed=context.seed,
            max_iter=self.max_iter,
            balanced=context.balanced,
        )
        return FittedHead(
            head=fit.linear,
            embedder=context.embedder_for(layer),
            layer=layer,
            params=params,
            extra={
                "calibration": (oof, train.labels),
                "calibration_source": "out-of-fold training logits",
            }
            if oof is not None
            else {},
        )


def fit_logistic_regression(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str],
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 1000,
    balanced: bool = False,
) -> LinearFit:
    """Pick ``C`` by stratified CV, refit on everything, fold into ``nn.Linear``.

    With fewer than two images in some class there is nothing to cross-validate:
    ``C=1.0`` is used and ``cv_accuracy`` is None. Raises :class:`DataError`
    when a class has no (readable) training image. ``balanced`` weights each
    class inversely to its frequency (for imbalanced data).
    """
    counts = np.bincount(labels, minlength=len(classes))
    missing = [classes[int(i)] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(f"no readable training images for class(es): {', '.join(missing)}")
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "lr",
                LogisticRegression(
                    max_iter=max_iter, class_weight="balanced" if balanced else None
                ),
            ),
        ]
    )
    n_splits = min(folds, int(counts.min()))
    with warnings.catch_warnings():
        # Some grid points (large C) may stop at max_iter inside CV; they simply
        # score worse. The refit's convergence is checked below.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        if n_splits >= 2:
            search = GridSearchCV(
                pipeline,
                {"lr__C": list(c_grid)},
                cv=StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed),
                scoring="accuracy",
                n_jobs=1,
            )
            search.fit(features, labels)
            best: Pipeline = search.best_estimator_
            c, cv_accuracy = float(search.best_params_["lr__C"]), float(search.best_score_)
            log.info(
                "C=%g by %d-fold CV (accuracy %.4f; grid %s)",
                c,
                n_splits,
                cv_accuracy,
                ", ".join(
                    f"{g:g}={s:.4f}"
                    for g, s in zip(c_grid, search.cv_results_["mean_test_score"], strict=True)
                ),
            )
        else:
            c, cv_accuracy, n_splits = 1.0, None, 0
            log.warning("a class has a single training image: no CV, using C=1")
            best = pipeline.set_params(lr__C=c).fit(features, labels)
    scaler: StandardScaler = best.named_steps["scale"]
    regression: LogisticRegression = best.named_steps["lr"]
    n_iter = int(np.max(regression.n_iter_))
    if n_iter >= max_iter:
        log.warning("logistic regression stopped at max_iter=%d before converging", max_iter)
    linear = fold_into_linear(scaler, regression, len(classes))
    return LinearFit(linear, c, cv_accuracy, n_splits, n_iter)


def out_of_fold_logits(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    c: float,
    folds: int,
    seed: int = 0,
    max_iter: int = 1000,
    balanced: bool = False,
) -> np.ndarray | None:
    """Cross-validated logits ``[N, C]`` of the chosen model, to fit the temperature on.

    Every training image is scored by a model that did not see it: many more
    held-out logits than a small validation split gives (None without CV).
    """
    if folds < 2:
        return None
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "lr",
                LogisticRegression(
                    C=c, max_iter=max_iter, class_weight="balanced" if balanced else None
                ),
            ),
        ]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        scores = cross_val_predict(
            pipeline,
            features,
            labels,
            cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
            method="decision_function",
        )
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    return scores


def fold_into_linear(
    scaler: StandardScaler, regression: LogisticRegression, n_classes: int
) -> torch.nn.Linear:
    """One ``nn.Linear`` whose softmax equals ``Pipeline([scaler, regression]).predict_proba``."""
    coef = np.asarray(regression.coef_, dtype=np.float64)
    intercept = np.asarray(regression.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:
        # Binary regression is sigmoid(z); softmax([-z/2, z/2]) is the same distribution.
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    weight = np.zeros((n_classes, coef.shape[1]))
    bias = np.zeros(n_classes)
    for row, label in enumerate(regression.classes_):
        weight[label] = coef[row] / scale
        bias[label] = intercept[row] - coef[row] @ (mean / scale)
    linear = torch.nn.Linear(coef.shape[1], n_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return linear.eval()
