"""Near-tied linear heads on one backbone, combined into one head instead of picking one.

When ``auto``'s linear heads on different layers of the same backbone score
within noise of each other, picking the highest point estimate is a coin
flip (on a held-out set it lost 1.2 points to the plain last-layer probe
that tied with it in CV). Their combination is scored as a candidate of its
own instead:

- *near-tied*: a linear head whose out-of-fold accuracy is at most one
  standard error of the paired difference below the best linear head's,
  on the same rows (:func:`~tlserve.training.fit.selection.paired_difference`);
- *combined*: the mean of the tied heads' logits. Each head is linear in the
  pooled features of its layers, so the mean is one ``nn.Linear`` on the
  union of their layers (:func:`average_heads`): the served graph still runs
  the backbone once and adds one Gemm;
- *scored* out of fold on the same folds: the mean of the heads' out-of-fold
  logits (each fold's models saw the same training rows), so it is compared
  with the others pairwise on the same rows, like any candidate.

Averaging logits is a geometric mean of the heads' probabilities (a product
of experts), renormalised by the softmax; the temperature is fitted on the
combined out-of-fold logits like any head's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tlserve.training.backbone.layers import MULTI, Layer, Layers, format_layer
from tlserve.training.fit.selection import Score, paired_difference
from tlserve.training.fit.strategies.base import FitContext, FittedHead, HeldOutLogits
from tlserve.training.fit.strategies.scoring import COMBINED, frozen_score

__all__ = ["TiedHead", "average_heads", "combine_candidate", "near_ties", "union_of"]


@dataclass(frozen=True)
class TiedHead:
    """One linear head in a tie: its layer(s), its head, its out-of-fold logits."""

    name: str
    layer: Layers
    head: torch.nn.Linear
    oof_logits: np.ndarray


def near_ties(scores: Sequence[Score]) -> list[Score]:
    """The scores within one standard error (paired) of the best of ``scores``, best first.

    The best is the highest accuracy (ties: the cheaper). Fewer than two
    means there is nothing to combine.
    """
    if not scores:
        return []
    best = max(scores, key=lambda s: (s.accuracy, -s.cost))
    tied = []
    for score in scores:
        diff, se, _ = paired_difference(best, score)
        if score is best or diff <= se:
            tied.append(score)
    return sorted(tied, key=lambda s: (-s.accuracy, s.cost))


def _single(layer: Layers) -> tuple[Layer, ...]:
    return layer if isinstance(layer, tuple) else (layer,)


def union_of(layers: Sequence[Layers], order: Sequence[Layer]) -> tuple[Layer, ...]:
    """Every single layer of ``layers``, once, in ``order`` (others after, as first seen)."""
    seen: list[Layer] = []
    for layer in layers:
        for one in _single(layer):
            if one not in seen:
                seen.append(one)
    rank = {layer: i for i, layer in enumerate(order)}
    return tuple(sorted(seen, key=lambda one: rank.get(one, len(rank) + seen.index(one))))


def average_heads(
    members: Sequence[TiedHead], union: tuple[Layer, ...], widths: Mapping[Layer, int]
) -> tuple[torch.nn.Linear, np.ndarray]:
    """One ``nn.Linear`` on ``union``'s concatenated features whose logits are the members' mean.

    ``widths`` gives each single layer's feature width. Also returns the
    members' mean out-of-fold logits (the combined head's, on the same folds).
    """
    if not members:
        raise ValueError("nothing to combine")
    offsets: dict[Layer, int] = {}
    start = 0
    for layer in union:
        offsets[layer] = start
        start += widths[layer]
    n_classes = members[0].head.out_features
    weight = torch.zeros(n_classes, start, dtype=torch.float64)
    bias = torch.zeros(n_classes, dtype=torch.float64)
    for member in members:
        w = member.head.weight.detach().to(torch.float64)
        column = 0
        for one in _single(member.layer):
            width = widths[one]
            weight[:, offsets[one] : offsets[one] + width] += w[:, column : column + width]
            column += width
        if column != w.shape[1]:
            raise ValueError(f"{member.name}: head has {w.shape[1]} inputs, its layers {column}")
        bias += member.head.bias.detach().to(torch.float64)
    k = float(len(members))
    linear = torch.nn.Linear(start, n_classes)
    with torch.no_grad():
        linear.weight.copy_((weight / k).to(torch.float32))
        linear.bias.copy_((bias / k).to(torch.float32))
    oof = np.mean([member.oof_logits for member in members], axis=0)
    return linear.eval(), oof


def combine_candidate(
    context: FitContext,
    fits: dict[str, FittedHead],
    scores: list[Score],
    serve_ms: float,
    notes: list[str],
) -> tuple[FittedHead, Score] | None:
    """The near-tied linear heads' average, as a candidate (see :mod:`.ties`)."""
    started = time.perf_counter()
    linear = [s for s in scores if s.name in fits and fits[s.name].calibration is not None]
    tied = near_ties(linear)
    if len(tied) < 2:
        return None
    members = []
    for score in tied:
        fitted = fits[score.name]
        assert fitted.calibration is not None and isinstance(fitted.head, torch.nn.Linear)
        members.append(TiedHead(score.name, fitted.layer, fitted.head, fitted.calibration.logits))
    union = union_of([m.layer for m in members], MULTI)
    widths = {one: context.features("train", one).embeddings.shape[1] for one in union}
    head, oof = average_heads(members, union, widths)
    labels = context.features("train", union).labels
    names = "+".join(m.name for m in members)
    fitted = FittedHead(
        head=head,
        embedder=context.embedder_for(union),
        strategy="linear",
        layer=union,
        params={
            "layer": format_layer(union),
            "combined": names,
            "folds": fits[tied[0].name].params.get("folds", "?"),
            **{f"C {m.name}": fits[m.name].params["C"] for m in members},
        },
        calibration=HeldOutLogits(oof, labels, f"out-of-fold training logits ({names}, averaged)"),
    )
    notes.append(
        f"Near-tied linear heads ({', '.join(s.name for s in tied)}: within one standard "
        f"error of {tied[0].name}) were also scored averaged, as {COMBINED}."
    )
    seconds = time.perf_counter() - started + sum(s.train_seconds for s in tied)
    score = frozen_score(context, COMBINED, fitted, seconds, serve_ms)
    return fitted, score
