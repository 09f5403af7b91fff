"""Pick a model by its measured validation score; ties within noise go to the cheaper one.

Every candidate ``auto`` tries is scored the same way: which validation rows
it got right. Frozen-feature heads are scored out of fold (the same
stratified folds for all of them, so every training image is a validation
row); trained-backbone candidates on one held-out slice of train. Two
candidates are compared on the rows both were scored on, pairwise, so the
noise of the comparison is that of the paired difference, not of each score.

The rule (:func:`select`), Breiman's one-standard-error rule made pairwise:

1. The *leader* is the candidate no other beats on their common rows
   (candidates taken cheapest first; a later one must be strictly better).
2. The *winner* is the leader of the cheapest tier (the whole part of
   ``cost``: 1 a linear head on frozen features, 2 trees, 3 a trained
   backbone) cheaper than the leader's whose deficit to the leader, on their
   common rows, is at most one standard error of that paired difference: it
   is not measurably worse, and it is really cheaper to serve or train; else
   the leader. A tier is represented by its own leader (rule 1 within the
   tier): the linear heads on different layers run the same backbone, so
   preferring the cheaper of them would give up expected accuracy for
   nothing.
3. Within a tier, a candidate that *combines* the others (``combines``: a
   head on all the probed layers at once, or the near-tied heads averaged)
   stands for the tier instead of the tier's leader when it is within one
   standard error of it: among near-ties the point estimate is a coin flip,
   and the combination is the hedge. (On the bench's five test sets the
   head on all layers scored at or above the best single layer's on every
   one, while 5-fold CV on 200 images ranked stage -2 first on three.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Score", "Selection", "paired_difference", "select", "wilson_interval"]

_Z95 = 1.959964


@dataclass(frozen=True)
class Score:
    """One candidate's validation result.

    ``rows`` name the validation rows (image paths) and ``correct`` says which
    it classified right. ``cost`` orders candidates for ties (lower is
    cheaper to serve and train; its whole part is the tier, see the module
    docstring). ``protocol`` says how it was scored. ``combines``: it
    combines its tier's other candidates (rule 3).
    """

    name: str
    rows: tuple[str, ...]
    correct: np.ndarray
    cost: float
    protocol: str = ""
    train_seconds: float = 0.0
    serve_ms_per_image: float | None = None
    serve_cost_source: str = ""
    figures: dict[str, float | int | str] = field(default_factory=dict)
    combines: bool = False

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.correct):
            raise ValueError(f"{self.name}: {len(self.rows)} rows but {len(self.correct)} scores")

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(int(np.sum(self.correct)), self.n)


@dataclass(frozen=True)
class Selection:
    """The winner, the leader it was measured against, and the sentence that says why."""

    winner: Score
    leader: Score
    reason: str


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike p ± 2 SE)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Score, b: Score) -> tuple[float, float, int]:
    """``accuracy(a) - accuracy(b)`` on their common rows, its standard error, and the row count.

    Without common rows the two are compared unpaired (independent samples).
    """
    index_b = {row: i for i, row in enumerate(b.rows)}
    pairs = [(i, index_b[row]) for i, row in enumerate(a.rows) if row in index_b]
    if not pairs:
        diff = a.accuracy - b.accuracy
        var = sum(s.accuracy * (1 - s.accuracy) / max(s.n, 1) for s in (a, b))
        return diff, math.sqrt(var), 0
    ia, ib = (np.array(side) for side in zip(*pairs, strict=True))
    d = a.correct[ia].astype(np.float64) - b.correct[ib].astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se, len(d)


def select(scores: Sequence[Score]) -> Selection:
    """The candidate to keep (see the module docstring for the rule)."""
    if not scores:
        raise ValueError("no candidate was scored")
    ranked = sorted(scores, key=lambda s: s.cost)
    leader = _leader(ranked)
    winner = _representative(ranked, _tier(leader))
    for tier in sorted({_tier(s) for s in ranked if _tier(s) < _tier(leader)}):
        best = _representative(ranked, tier)
        diff, se, _ = paired_difference(leader, best)
        if diff <= se:
            winner = best
            break
    figure = f"{winner.accuracy:.1%} ({winner.protocol})" if winner.protocol else ""
    figure = figure or f"{winner.accuracy:.1%}"
    if winner is leader:
        others = [s for s in ranked if s is not winner]
        reason = f"{winner.name} scored best: {figure}" + (
            "; " + ", ".join(_versus(winner, s) for s in others) if others else ""
        )
    elif _tier(winner) == _tier(leader):
        reason = (
            f"{winner.name} ({figure}) combines the near-tied heads and is within one "
            f"standard error of the best, {leader.name}: {_versus(leader, winner)}"
        )
    else:
        reason = (
            f"{winner.name} ({figure}) is within one standard "
            f"error of the best, {leader.name}, and cheaper: {_versus(leader, winner)}"
        )
    return Selection(winner=winner, leader=leader, reason=reason)


def _tier(score: Score) -> int:
    return math.floor(score.cost)


def _leader(ranked: Sequence[Score]) -> Score:
    """The candidate no other beats on their common rows; ``ranked`` cheapest first,
    and a later one must be strictly better to take the lead."""
    leader = ranked[0]
    for candidate in ranked[1:]:
        if paired_difference(candidate, leader)[0] > 0:
            leader = candidate
    return leader


def _representative(ranked: Sequence[Score], tier: int) -> Score:
    """The candidate that stands for ``tier``: its leader, or a combination within noise of it."""
    members = [s for s in ranked if _tier(s) == tier]
    leader = _leader(members)
    hedges = []
    for score in members:
        if score.combines and score is not leader:
            diff, se, _ = paired_difference(leader, score)
            if diff <= se:
                hedges.append(score)
    return _leader(hedges) if hedges else leader


def _versus(a: Score, b: Score) -> str:
    diff, se, n = paired_difference(a, b)
    rows = f"on {n} common rows" if n else "unpaired"
    return f"{diff:+.1%} ± {se:.1%} vs {b.name} ({rows})"
