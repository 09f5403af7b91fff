"""Frozen backbone + multinomial logistic regression (the "small data, like ImageNet" case).

Features are standardised and fed to scikit-learn's ``LogisticRegression``;
the regularisation strength ``C`` is picked from a small grid by stratified
k-fold cross-validation on the training features. Several layers'
features concatenated (``multi``) are standardised per feature and then
weighted per layer, so that each layer carries the same share of the
penalty whatever its width (:func:`block_weights`): plainly standardised,
lite0's 1,280-wide embedding is 73% of ``multi``'s features, and the
narrow earlier stages counted for little. The fitted scaler and
regression are then folded into one ``torch.nn.Linear``::

    logits = W · (x - mean) / scale + b  =  (W / scale) · x + (b - W · mean / scale)

so the exported head is a single Gemm, with no scikit-learn at serving time.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from tlserve.training.backbone.layers import Layers, format_layer, parse_layer
from tlserve.training.data.folders import DataError
from tlserve.training.fit.strategies.base import FitContext, FittedHead, HeldOutLogits

__all__ = [
    "DEFAULT_C_GRID",
    "LinearFit",
    "LinearProbe",
    "block_weights",
    "cv_folds",
    "fit_logistic_regression",
    "fold_into_linear",
]

log = logging.getLogger(__name__)

DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass(frozen=True)
class LinearFit:
    """The fitted head and how it was chosen (``cv_accuracy`` is None without CV).

    ``oof_logits`` ``[N, C]`` are the out-of-fold logits at the chosen ``C``:
    each training row scored by a model fitted on the other folds (None
    without CV). They score the head for ``auto`` and calibrate it.
    """

    linear: torch.nn.Linear
    c: float
    cv_accuracy: float | None
    folds: int
    n_iter: int
    oof_logits: np.ndarray | None = None


@dataclass
class LinearProbe:
    """Strategy ``linear``: logistic regression on frozen embeddings.

    ``layer`` (``None``: the last, else e.g. ``-2``, or several to
    concatenate, e.g. ``multi``) picks the features (:mod:`~tlserve.training.backbone.layers`).
    """

    name: ClassVar[str] = "linear"
    c_grid: Sequence[float] = DEFAULT_C_GRID
    folds: int = 5
    max_iter: int = 1000
    layer: Layers | str = None

    def fit(self, context: FitContext) -> FittedHead:
        layer = parse_layer(self.layer)
        train = context.features("train", layer)
        blocks = (
            [context.features("train", one).embeddings.shape[1] for one in layer]
            if isinstance(layer, tuple)
            else None
        )
        fit = fit_logistic_regression(
            train.embeddings,
            train.labels,
            classes=context.classes,
            blocks=blocks,
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
        return FittedHead(
            head=fit.linear,
            embedder=context.embedder_for(layer),
            strategy=self.name,
            layer=layer,
            params=params,
            calibration=HeldOutLogits(fit.oof_logits, train.labels, "out-of-fold training logits")
            if fit.oof_logits is not None
            else None,
        )


def cv_folds(labels: np.ndarray, folds: int, seed: int) -> StratifiedKFold | None:
    """The stratified folds every frozen-feature head is scored on (None: too few images)."""
    n_splits = min(folds, int(np.bincount(labels).min())) if len(labels) else 0
    if n_splits < 2:
        return None
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


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
    blocks: Sequence[int] | None = None,
) -> LinearFit:
    """Pick ``C`` by stratified CV, refit on everything, fold into ``nn.Linear``.

    Every fold fits the grid from small to large ``C``, each fit starting from
    the previous one's weights (warm start: the path costs little more than
    one fit); ``C`` is the one with the best out-of-fold accuracy (ties: the
    smaller, stronger-regularised ``C``). With fewer than two images in some
    class there is nothing to cross-validate: ``C=1.0`` is used (or the one
    ``C`` of a one-value grid) and ``cv_accuracy`` is None. Raises
    :class:`DataError` when a class has no (readable) training image.
    ``balanced`` weights each class inversely to its frequency (for imbalanced
    data). ``blocks`` are the widths of concatenated layers' features, in
    order (:func:`block_weights`); None: one block.
    """
    counts = np.bincount(labels, minlength=len(classes))
    missing = [classes[int(i)] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(f"no readable training images for class(es): {', '.join(missing)}")
    grid = sorted(float(c) for c in c_grid)
    splitter = cv_folds(labels, folds, seed)
    c, cv_accuracy, n_splits, oof = 1.0, None, 0, None
    if splitter is not None:
        n_splits = splitter.get_n_splits()
        scores = np.zeros((len(grid), len(labels), len(classes)))
        for fit_on, score_on in splitter.split(features, labels):
            path = _regularisation_path(
                features[fit_on],
                labels[fit_on],
                grid,
                max_iter=max_iter,
                balanced=balanced,
                blocks=blocks,
            )
            for g, (scaler, regression) in enumerate(path):
                scores[g][score_on] = _logits(scaler, regression, features[score_on], len(classes))
        accuracy = (scores.argmax(axis=2) == labels).mean(axis=1)
        best = int(np.argmax(accuracy))  # first maximum: the smallest C
        c, cv_accuracy, oof = grid[best], float(accuracy[best]), scores[best]
        log.info(
            "C=%g by %d-fold CV (accuracy %.4f; grid %s)",
            c,
            n_splits,
            cv_accuracy,
            ", ".join(f"{g:g}={a:.4f}" for g, a in zip(grid, accuracy, strict=True)),
        )
    elif len(grid) == 1:  # C given (chosen by an earlier CV): nothing to choose
        c = grid[0]
    else:
        log.warning("a class has a single training image: no CV, using C=1")
    ((scaler, regression),) = _regularisation_path(
        features, labels, [c], max_iter=max_iter, balanced=balanced, blocks=blocks
    )
    n_iter = int(np.max(regression.n_iter_))
    if n_iter >= max_iter:
        log.warning("logistic regression stopped at max_iter=%d before converging", max_iter)
    linear = fold_into_linear(scaler, regression, len(classes))
    return LinearFit(linear, c, cv_accuracy, n_splits, n_iter, oof)


def _regularisation_path(
    features: np.ndarray,
    labels: np.ndarray,
    grid: Sequence[float],
    *,
    max_iter: int,
    balanced: bool,
    blocks: Sequence[int] | None,
) -> list[tuple[StandardScaler, LogisticRegression]]:
    """One fitted (scaler, regression) per ``C`` in ascending ``grid``, warm-started."""
    scaler = StandardScaler().fit(features)
    if blocks is not None:
        if sum(blocks) != features.shape[1]:
            raise ValueError(f"blocks {list(blocks)} do not add up to {features.shape[1]} features")
        # Weighting a standardised feature is dividing by a larger scale: the
        # scaler still transforms, and folds into the exported Linear, alone.
        scaler.scale_ = scaler.scale_ / block_weights(blocks)
    scaled = scaler.transform(features)
    # lbfgs on a few thousand rows makes many small matrix products, where BLAS
    # threads cost more than they give: measured on lite0's 1280-dim features
    # of the example data (800 rows, 10 classes, the 5-C path), 3.2 s with
    # OpenBLAS's 2 threads against 0.5 s with one.
    with threadpool_limits(1):
        return _fit_path(scaler, scaled, labels, grid, max_iter=max_iter, balanced=balanced)


def block_weights(blocks: Sequence[int]) -> np.ndarray:
    """Per-feature weights giving each block (a layer's ``width`` features) an equal share.

    A standardised block of width ``w`` weighted by ``sqrt(D / (B * w))`` has
    total variance ``D / B`` (``D`` features in ``B`` blocks): every layer
    counts the same under the L2 penalty, and the whole keeps the variance
    ``D`` it had, so the ``C`` grid means what it means for one layer.
    """
    widths = np.asarray(blocks, dtype=np.float64)
    if widths.size == 0 or np.any(widths <= 0):
        raise ValueError(f"block widths must be positive, got {list(blocks)}")
    per_block = np.sqrt(widths.sum() / (len(widths) * widths))
    return np.repeat(per_block, widths.astype(np.int64))


def _fit_path(
    scaler: StandardScaler,
    scaled: np.ndarray,
    labels: np.ndarray,
    grid: Sequence[float],
    *,
    max_iter: int,
    balanced: bool,
) -> list[tuple[StandardScaler, LogisticRegression]]:
    regression = LogisticRegression(
        max_iter=max_iter, warm_start=True, class_weight="balanced" if balanced else None
    )
    path = []
    with warnings.catch_warnings():
        # Large C may stop at max_iter inside CV; it then simply scores worse.
        # The final refit's convergence is checked by the caller.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        for c in grid:
            regression.set_params(C=c).fit(scaled, labels)
            path.append((scaler, copy.deepcopy(regression)))
    return path


def _logits(
    scaler: StandardScaler, regression: LogisticRegression, features: np.ndarray, n_classes: int
) -> np.ndarray:
    """Logits ``[N, n_classes]`` in class order (binary: ``[-z/2, z/2]``, as the folded head)."""
    scores = np.asarray(regression.decision_function(scaler.transform(features)), np.float64)
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    out = np.full((len(features), n_classes), -1e9)
    out[:, regression.classes_] = scores
    return out


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
