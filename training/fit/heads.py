"""Heads: what maps embeddings to class scores, with a temperature.

A head is either a torch module (embeddings → logits: the linear probe, the
fine-tuned classifier) or a :class:`TreeHead` (scikit-learn gradient-boosted
trees, exported with skl2onnx and joined to the backbone graph). Both take a
temperature: probabilities are ``softmax(logits / T)``, with ``log p`` as the
trees' logits, and ``T`` (chosen in :mod:`~tlserve.training.fit.calibration`) is
folded into the exported graph.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

__all__ = [
    "Head",
    "TemperatureScaled",
    "TreeHead",
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
