"""The linear strategy: CV-chosen C, and the folded nn.Linear equals scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tlserve.training.data.folders import DataError
from tlserve.training.fit.strategies import STRATEGIES, create_strategy
from tlserve.training.fit.strategies.linear import (
    DEFAULT_C_GRID,
    LinearProbe,
    block_weights,
    fit_logistic_regression,
    fold_into_linear,
)


def blobs(
    n_classes: int, per_class: int = 20, dim: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters with very different feature scales (the scaler matters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_classes, dim))
    x = np.concatenate([rng.normal(c, 1.0, size=(per_class, dim)) for c in centres])
    x = (x * np.logspace(-2, 2, dim) + 5.0).astype(np.float32)
    y = np.repeat(np.arange(n_classes), per_class)
    return x, y


@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_linear_matches_sklearn_predict_proba(n_classes: int) -> None:
    x, y = blobs(n_classes)
    scaler = StandardScaler().fit(x)
    regression = LogisticRegression(C=0.5, max_iter=1000).fit(scaler.transform(x), y)
    linear = fold_into_linear(scaler, regression, n_classes)
    with torch.inference_mode():
        ours = torch.softmax(linear(torch.from_numpy(x)), dim=1).numpy()
    expected = regression.predict_proba(scaler.transform(x))
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_c_is_chosen_by_cv_and_reproducible() -> None:
    x, y = blobs(3, per_class=15)
    classes = ("a", "b", "c")
    first = fit_logistic_regression(x, y, classes=classes, seed=1)
    again = fit_logistic_regression(x, y, classes=classes, seed=1)
    assert first.c in DEFAULT_C_GRID and first.folds == 5
    assert first.cv_accuracy is not None and first.cv_accuracy > 0.8
    assert (first.c, first.cv_accuracy) == (again.c, again.cv_accuracy)
    assert torch.equal(first.linear.weight, again.linear.weight)


def test_tiny_classes_fall_back_to_fewer_folds_or_no_cv() -> None:
    x, y = blobs(2, per_class=3)
    assert fit_logistic_regression(x, y, classes=("a", "b")).folds == 3
    one_each = fit_logistic_regression(x[[0, 3]], y[[0, 3]], classes=("a", "b"))
    assert (one_each.folds, one_each.c, one_each.cv_accuracy) == (0, 1.0, None)
    # A C chosen before (fine-tuning's head starts from auto's probe): used as given.
    given = fit_logistic_regression(x, y, classes=("a", "b"), c_grid=(0.01,), folds=0)
    assert (given.folds, given.c) == (0, 0.01)


def test_a_class_without_training_features_is_named() -> None:
    x, y = blobs(2)
    with pytest.raises(DataError, match="class\\(es\\): c"):
        fit_logistic_regression(x, y, classes=("a", "b", "c"))


def test_registry() -> None:
    assert STRATEGIES["linear"] is LinearProbe
    assert isinstance(create_strategy("linear", folds=3), LinearProbe)
    with pytest.raises(ValueError, match=r"unknown strategy 'magic': available are auto, fine"):
        create_strategy("magic")


def test_block_weights_give_every_layer_an_equal_share_of_the_variance() -> None:
    weights = block_weights([2, 6])
    assert weights.shape == (8,)
    # Each standardised block's total variance is D / B = 4; the whole keeps D = 8.
    assert (weights[:2] ** 2).sum() == pytest.approx(4.0)
    assert (weights[2:] ** 2).sum() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="positive"):
        block_weights([3, 0])


def test_a_narrow_informative_layer_beside_a_wide_one_is_not_drowned() -> None:
    """``multi``'s case: a few useful earlier-stage features next to a wide embedding."""
    rng = np.random.default_rng(0)
    n_classes, per_class, narrow, wide = 3, 60, 6, 400
    y = np.repeat(np.arange(n_classes), per_class * 2)
    centres = rng.normal(0, 0.6, size=(n_classes, narrow))
    useful = centres[y] + rng.normal(0, 1.0, size=(len(y), narrow))
    x = np.concatenate([useful, rng.normal(0, 1.0, size=(len(y), wide))], axis=1)
    x = x.astype(np.float32)
    train = np.arange(len(y)) % 2 == 0
    classes = ("a", "b", "c")

    def test_accuracy(blocks: list[int] | None) -> float:
        fit = fit_logistic_regression(x[train], y[train], classes=classes, blocks=blocks)
        with torch.inference_mode():
            predicted = fit.linear(torch.from_numpy(x[~train])).argmax(1).numpy()
        return float((predicted == y[~train]).mean())

    plain, weighted = test_accuracy(None), test_accuracy([narrow, wide])
    assert weighted >= plain + 0.05, (plain, weighted)
    with pytest.raises(ValueError, match="add up"):
        fit_logistic_regression(x, y, classes=classes, blocks=[narrow, wide - 1])
