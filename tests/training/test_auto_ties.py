"""Near-tied linear heads: combined into one head, and taken only when the combination scores best.

Synthetic features where the answer is known: two "layers" that each see the
label through independent noise (their average is truly better than either),
and two that see the same signal (averaging them gains nothing).
"""

from __future__ import annotations

import numpy as np
import torch

from tlserve.training.backbone.layers import MULTI
from tlserve.training.fit.selection import Score, select
from tlserve.training.fit.strategies.linear import fit_logistic_regression
from tlserve.training.fit.strategies.scoring import COMBINED
from tlserve.training.fit.strategies.ties import TiedHead, average_heads, near_ties, union_of

CLASSES = ("a", "b", "c")
N = 600


def _labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CLASSES), N)


def _view(labels: np.ndarray, noise: float, seed: int, width: int = 8) -> np.ndarray:
    """Features whose first columns are the one-hot label plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    signal = np.zeros((len(labels), width))
    signal[np.arange(len(labels)), labels] = 1.0
    return (signal + noise * rng.standard_normal(signal.shape)).astype(np.float32)


def _score(name: str, logits: np.ndarray, labels: np.ndarray, cost: float) -> Score:
    rows = tuple(f"img{i}" for i in range(len(labels)))
    return Score(name=name, rows=rows, correct=logits.argmax(1) == labels, cost=cost)


def _head(name: str, layer: int | None, features: np.ndarray, labels: np.ndarray) -> TiedHead:
    fit = fit_logistic_regression(features, labels, classes=CLASSES, folds=5, seed=0)
    assert fit.oof_logits is not None
    return TiedHead(name, layer, fit.linear, fit.oof_logits)


def _candidates(
    views: dict[int | None, np.ndarray], labels: np.ndarray
) -> tuple[list[TiedHead], list[Score]]:
    heads = [_head(f"linear@{layer}", layer, f, labels) for layer, f in views.items()]
    scores = [_score(h.name, h.oof_logits, labels, 1.0 + i / 10) for i, h in enumerate(heads)]
    return heads, scores


def _combined(
    heads: list[TiedHead], scores: list[Score], views: dict[int | None, np.ndarray]
) -> tuple[torch.nn.Linear, Score, tuple[int | None, ...]]:
    tied = {s.name for s in near_ties(scores)}
    members = [h for h in heads if h.name in tied]
    union = union_of([m.layer for m in members], MULTI)
    linear, oof = average_heads(members, union, {k: v.shape[1] for k, v in views.items()})
    labels = _labels()
    return linear, _score(COMBINED, oof, labels, 1.3), union


def test_independent_views_tie_and_their_combination_is_taken() -> None:
    labels = _labels()
    views = {None: _view(labels, 1.1, seed=1), -2: _view(labels, 1.1, seed=2)}
    heads, scores = _candidates(views, labels)
    assert len(near_ties(scores)) == 2  # each alone about the same, within noise
    linear, combined, union = _combined(heads, scores, views)
    assert union == (None, -2)  # in the backbone's order, the last layer first
    assert combined.accuracy > max(s.accuracy for s in scores) + 0.03
    selection = select([*scores, combined])
    assert selection.winner.name == COMBINED

    # One head on the concatenated features: its logits are the members' mean, exactly.
    x = np.concatenate([views[None], views[-2]], axis=1)
    with torch.inference_mode():
        got = linear(torch.from_numpy(x)).numpy()
        pairs = zip(heads, views.values(), strict=True)
        want = np.mean([h.head(torch.from_numpy(v)).numpy() for h, v in pairs], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_same_signal_ties_but_the_combination_is_not_taken_unless_better() -> None:
    labels = _labels()
    base = _view(labels, 1.1, seed=1)
    noise = 0.01 * np.random.default_rng(5).standard_normal(base.shape).astype(np.float32)
    views = {None: base, -2: base + noise}  # the same information twice
    heads, scores = _candidates(views, labels)
    assert len(near_ties(scores)) == 2
    _, combined, _ = _combined(heads, scores, views)
    assert abs(combined.accuracy - scores[0].accuracy) < 0.02  # averaging gains nothing
    best = max(scores, key=lambda s: (s.accuracy, -s.cost))
    winner = select([*scores, combined]).winner
    assert winner.name == (COMBINED if combined.accuracy > best.accuracy else best.name)


def test_heads_far_apart_are_not_combined() -> None:
    labels = _labels()
    views = {None: _view(labels, 0.4, seed=1), -2: _view(labels, 3.0, seed=2)}
    _, scores = _candidates(views, labels)
    tied = near_ties(scores)
    assert [s.name for s in tied] == ["linear@None"]  # nothing to combine


def test_a_worse_combination_loses_to_the_single_head() -> None:
    rows = tuple(f"img{i}" for i in range(N))
    correct = np.random.default_rng(0).random(N) < 0.8
    leader = Score("linear", rows, correct, cost=1.0)
    worse = correct.copy()
    worse[np.flatnonzero(correct)[:30]] = False  # 5 points below, on the same rows
    assert select([leader, Score(COMBINED, rows, worse, cost=1.3)]).winner.name == "linear"


def test_union_keeps_each_layer_once_in_the_backbone_order() -> None:
    assert union_of([-2, None], MULTI) == (None, -2)
    assert union_of([None, MULTI], MULTI) == MULTI
    assert union_of([-2, (None, -2)], MULTI) == (None, -2)
