"""Heads: what maps embeddings to class scores, and temperature calibration.

A head is either a torch module (embeddings → logits: the linear probe, the
fine-tuned classifier) or a :class:`TreeHead` (scikit-learn gradient-boosted
trees, exported with skl2onnx and joined to the backbone graph). Both take a
temperature: probabilities are ``softmax(logits / T)``, with ``log p`` as the
trees' logits, and ``T`` is folded into the exported graph.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

__all__ = [
    "Head",
    "TemperatureScaled",
    "TreeHead",
    "choose_temperature",
    "fit_temperature",
    "head_logits",
    "softmax",
    "with_temperature",
]

_EPS = 1e-7


class TemperatureScaled(torch.nn.Module):
    """``head(x) / temperature``: a calibrated torch head."""

    def __init__(self, head: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.head = head
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(x)
        return logits * (1.0 / self.temperature)


class TreeHead:
    """A fitted :class:`HistGradientBoostingClassifier` over embeddings.

    Thresholds are snapped down to float32 after fitting (see
    :func:`snap_thresholds`) so onnxruntime's float32 comparisons take the
    same branches as scikit-learn's float64 ones on float32 embeddings.
    """

    def __init__(
        self, estimator: HistGradientBoostingClassifier, n_classes: int, temperature: float = 1.0
    ) -> None:
        if list(estimator.classes_) != list(range(n_classes)):
            raise ValueError("the tree head must have seen every class")
        self.estimator = estimator
        self.n_classes = n_classes
        self.temperature = float(temperature)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """``log p / T``: softmax of this gives the calibrated probabilities."""
        probabilities = self.estimator.predict_proba(embeddings.astype(np.float32))
        logits: np.ndarray = np.log(np.clip(probabilities, _EPS, None)) / self.temperature
        return logits


Head = torch.nn.Module | TreeHead


def snap_thresholds(estimator: HistGradientBoostingClassifier) -> None:
    """Round every split threshold down to the nearest float32.

    For a float32 input ``x``, ``x <= t`` iff ``x <= t32`` where ``t32`` is the
    largest float32 not above ``t``; then the float32 ONNX tree agrees exactly.
    """
    for predictors in estimator._predictors:
        for predictor in predictors:
            nodes = predictor.nodes
            thresholds = nodes["num_threshold"].astype(np.float32)
            too_big = thresholds.astype(np.float64) > nodes["num_threshold"]
            thresholds[too_big] = np.nextafter(thresholds[too_big], np.float32(-np.inf))
            nodes["num_threshold"] = thresholds.astype(np.float64)


def head_logits(head: Head, embeddings: np.ndarray) -> np.ndarray:
    """Logits ``[N, C]`` of ``head`` on float32 ``embeddings`` ``[N, D]``."""
    if isinstance(head, TreeHead):
        return head.logits(embeddings)
    head.eval()
    with torch.inference_mode():
        logits: np.ndarray = head(torch.from_numpy(embeddings)).numpy()
    return logits.astype(np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def with_temperature(head: Head, temperature: float) -> Head:
    """The same head, its logits divided by ``temperature``."""
    if isinstance(head, TreeHead):
        return TreeHead(head.estimator, head.n_classes, temperature * head.temperature)
    return TemperatureScaled(head, temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    A 1-D search over ``log T`` in [-3, 3] (golden section on a convex curve):
    deterministic and needs no optimiser state.
    """
    logits = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        scaled = logits / np.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(scaled).sum(axis=1))
        return float(np.mean(log_z - scaled[np.arange(len(labels)), labels]))

    low, high = -3.0, 3.0
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2.0))


def choose_temperature(
    logits: np.ndarray, labels: np.ndarray, *, seed: int = 0
) -> tuple[float, dict[str, float]]:
    """Fit ``T`` and keep it only if it lowers ECE on data it was not fitted on.

    The logits are split in two stratified-at-random halves; ``T`` fitted on
    each half is scored (expected calibration error) on the other, against
    ``T = 1``. With a few hundred images ECE is noisy and an already
    well-calibrated head (a cross-validated logistic regression often is) can
    get worse; then ``T = 1`` is kept. Returns ``T`` and the figures.
    """
    from tlserve.training.evaluate import expected_calibration_error

    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    before, after = [], []
    for fit_on, score_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        before.append(expected_calibration_error(softmax(logits[score_on]), labels[score_on]))
        after.append(expected_calibration_error(softmax(logits[score_on] / t), labels[score_on]))
    fitted = fit_temperature(logits, labels)
    figures = {
        "fitted_temperature": fitted,
        "cv_ece_t1": float(np.mean(before)),
        "cv_ece_fitted": float(np.mean(after)),
    }
    return (fitted if figures["cv_ece_fitted"] < figures["cv_ece_t1"] else 1.0), figures
