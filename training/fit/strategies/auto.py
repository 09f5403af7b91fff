"""``auto``: try the candidates on one validation protocol, keep the measured best, say why.

Candidates, cheapest first:

1. ``linear`` on the last layer, on an earlier stage (``earlier``) and on
   the pooled stages concatenated (``multi``): scored out of fold on the
   same stratified folds of the training images, all from one forward pass;
2. ``trees`` on the last layer, on the same folds, if the time budget allows
   (its cost is projected from one timed fit);
3. ``finetune`` and ``scratch``, scored on one validation slice held out of
   train, raced by successive halving: each trains ``rung_epochs``, only the
   leader continues (to twice as many epochs, and so on, with early
   stopping), and no epoch starts that the measured pace says would end
   after the budget. The four-scenario table
   (:mod:`~tlserve.training.fit.strategies.scenarios`) only decides which of the
   two goes first.

The winner is chosen by :func:`~tlserve.training.fit.selection.select`: the best
on common validation rows, or the cheapest candidate within one standard
error of it. Frozen-feature winners are already refitted on every training
image; a trained-backbone winner keeps its best epoch (trained on train minus
the slice, which stays its calibration set). Serving cost is estimated from
the backbone's forward time measured here (torch, one batch): every
candidate runs the same network; trees add their measured predict time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tlserve.training.backbone.backbones import Backbone
from tlserve.training.backbone.layers import MULTI, Layer, Layers, format_layer, parse_layer
from tlserve.training.data.folders import DataError
from tlserve.training.features.extract import load_images
from tlserve.training.fit.heads import head_logits
from tlserve.training.fit.selection import Score, select
from tlserve.training.fit.strategies.base import FitContext, FittedHead
from tlserve.training.fit.strategies.finetune import FineTune, Scratch
from tlserve.training.fit.strategies.linear import LinearProbe
from tlserve.training.fit.strategies.run import BackboneRun
from tlserve.training.fit.strategies.scenarios import choose, measure
from tlserve.training.fit.strategies.trees import TreeProbe
from tlserve.training.fit.strategies.validation import prepare_run_images

__all__ = ["AutoStrategy", "probe_layers"]

log = logging.getLogger(__name__)

# Tie-break order: cheaper to train (and, for trees, to serve) first. The whole
# part is the tier (selection.select): linear heads on any layer are tier 1.
_COST = {"linear": 1.0, "linear@multi": 1.2, "trees": 2.0}
_EARLIER_COST = 1.1
_TRAINED_COST = {"finetune": 3.0, "scratch": 3.1}
# A training step (forward + backward + update) costs about three forwards.
_TRAIN_STEP_FORWARDS = 3.0
_EXPORT_SECONDS = 10.0  # export, its check, and publishing, on 2 cores


@dataclass
class AutoStrategy:
    """Strategy ``auto``: score every affordable candidate, keep the measured best."""

    name: ClassVar[str] = "auto"
    earlier: Layer | str = -2
    folds: int = 5
    trees: bool = True
    trained: tuple[str, ...] = ("finetune", "scratch")
    rung_epochs: int = 2
    large_per_class: int = 300
    margin: float = 0.01
    min_confidence: float = 0.15
    options: dict[str, Any] = field(default_factory=dict)  # passed to finetune/scratch

    def fit(self, context: FitContext) -> FittedHead:
        earlier = parse_layer(self.earlier)
        staged = _has_stages(context.backbone)
        context.probe_layers = probe_layers(context.backbone)
        frozen: list[tuple[str, Layers]] = [("linear", None)]
        if staged:
            frozen += [(f"linear@{format_layer(earlier)}", earlier), ("linear@multi", MULTI)]
        # One forward pass embeds every layer the candidates use (FitContext.probe_layers).
        _progress(context, f"embedding {len(context.splits['train'])} training images")
        serve_ms = _forward_ms(context)
        reserve = _EXPORT_SECONDS + serve_ms / 1000 * sum(
            len(context.splits.get(s, [])) for s in ("val", "test")
        )
        deadline = None if context.deadline is None else context.deadline - reserve
        fits: dict[str, FittedHead] = {}
        scores: list[Score] = []
        for name, layer in frozen:
            _progress(context, f"trying {name} ({self.folds}-fold CV)")
            started = time.perf_counter()
            fitted = LinearProbe(layer=layer, folds=self.folds).fit(context)
            fits[name] = fitted
            seconds = time.perf_counter() - started
            scores.append(_frozen_score(context, name, fitted, seconds, serve_ms))
        probes = {s.name: s.accuracy for s in scores}
        earlier_name = f"linear@{format_layer(earlier)}"
        m = measure(context, probes.get("linear"), probes.get(earlier_name), format_layer(earlier))
        prior, _, scenario = choose(
            m,
            large_per_class=self.large_per_class,
            margin=self.margin,
            min_confidence=self.min_confidence,
        )
        notes: list[str] = [f"Four-scenario table: {scenario}"]
        if self.trees:
            _progress(context, "trying trees (if one fit and its folds fit in the budget)")
            tree = self._trees(context, serve_ms, deadline, notes)
            if tree is not None:
                fits["trees"], score = tree
                scores.append(score)
        order = sorted(self.trained, key=lambda n: (n != prior, _TRAINED_COST.get(n, 9.0)))
        probe_c = float(fits["linear"].params["C"])
        runs = self._race(context, order, probe_c, serve_ms, deadline, notes) if order else {}
        scores += [_trained_score(name, run, serve_ms) for name, run in runs.items()]
        selection = select(scores)
        winner = selection.winner.name
        chosen = runs[winner].finish() if winner in runs else fits[winner]
        reason = f"{selection.reason}. " + " ".join(notes)
        log.info("auto: %s", reason)
        for score in sorted(scores, key=lambda s: s.cost):
            low, high = score.interval
            log.info(
                "auto: %-13s %.1f%% [%.1f, %.1f] on %d rows, %.0f s",
                score.name,
                100 * score.accuracy,
                100 * low,
                100 * high,
                score.n,
                score.train_seconds,
            )
        return FittedHead(
            head=chosen.head,
            embedder=chosen.embedder,
            strategy=chosen.strategy,
            layer=chosen.layer,
            trained_backbone=chosen.trained_backbone,
            params={**m.as_params(), "auto_winner": winner, **chosen.params},
            history=chosen.history,
            calibration=chosen.calibration,
            skipped=chosen.skipped,
            lr_curve=chosen.lr_curve,
            val_images=chosen.val_images,
            reason=reason,
            candidates=tuple(scores),
        )

    def _trees(
        self, context: FitContext, serve_ms: float, deadline: float | None, notes: list[str]
    ) -> tuple[FittedHead, Score] | None:
        started = time.perf_counter()
        left = math.inf if deadline is None else deadline - time.monotonic()
        # Spent already: not even the one timed fit (it alone can take minutes).
        fitted = TreeProbe(folds=self.folds).fit_within(context, left) if left > 0 else None
        if fitted is None:
            notes.append("trees not scored: its cross-validation would pass the time budget.")
            return None
        seconds = time.perf_counter() - started
        rows = context.features("train").embeddings[:256]
        t0 = time.perf_counter()
        head_logits(fitted.head, rows)
        predict_ms = 1000 * (time.perf_counter() - t0) / max(1, len(rows))
        return fitted, _frozen_score(context, "trees", fitted, seconds, serve_ms + predict_ms)

    def _race(
        self,
        context: FitContext,
        order: list[str],
        probe_c: float,
        serve_ms: float,
        deadline: float | None,
        notes: list[str],
    ) -> dict[str, BackboneRun]:
        """Successive halving over the trained-backbone candidates, within ``deadline``."""
        n_train = len(context.splits["train"])
        first = _TRAIN_STEP_FORWARDS * serve_ms / 1000 * n_train * self.rung_epochs
        left = math.inf if deadline is None else deadline - time.monotonic()
        if first > left:
            notes.append(
                f"Time budget spent after the cheap candidates ({max(left, 0):.0f} s left): "
                f"{', '.join(order)} not tried; {self.rung_epochs} epochs of one were "
                f"projected at {first:.0f} s from the measured forward time "
                "(raise --time-budget to try them)."
            )
            _progress(context, notes[-1])
            return {}
        data = prepare_run_images(context, FineTune.val_fraction)
        runs: dict[str, BackboneRun] = {}
        recipes = {"finetune": FineTune(**self.options), "scratch": Scratch(**self.options)}
        for name in order:
            _progress(context, f"trying {name}: {self.rung_epochs} epochs")
            # The head starts from the last-layer probe's C (already chosen by CV).
            run = BackboneRun(recipes[name], context, data, probe_c=probe_c)
            run.advance(self.rung_epochs, deadline)
            if run.epochs_done:
                runs[name] = run
            else:
                notes.append(f"{name} not scored: its first epoch would pass the time budget.")
        alive = sorted(runs, key=lambda n: -runs[n].stopper.best_accuracy)
        target = self.rung_epochs
        while alive:
            alive = alive[: max(1, math.ceil(len(alive) / 2))]
            target *= 2
            for name in alive:
                run = runs[name]
                pace = run.epoch_seconds or math.inf
                left = math.inf if deadline is None else deadline - time.monotonic()
                affordable = int(left // pace) if math.isfinite(left) else target
                epochs = min(target - run.epochs_done, affordable)
                if epochs <= 0 or run.done:
                    continue
                _progress(context, f"continuing {name} to epoch {run.epochs_done + epochs}")
                run.advance(epochs, deadline)
            alive = [n for n in alive if not runs[n].done and runs[n].epochs_done >= target]
        return runs

    def __post_init__(self) -> None:
        unknown = set(self.trained) - set(_TRAINED_COST)
        if unknown:
            raise ValueError(f"auto: unknown trained candidates {sorted(unknown)}")


def _has_stages(backbone: Backbone) -> bool:
    return bool(getattr(backbone.module, "feature_info", None)) and hasattr(
        backbone.module, "forward_intermediates"
    )


def probe_layers(backbone: Backbone) -> tuple[Layer, ...]:
    """The layers ``auto``'s frozen-feature candidates use, embedded in one forward pass.

    ``train()`` sets them before the data check embeds the training images,
    so that one pass serves both (measured on the example data: a second
    pass of 1,000 images took 19 s of auto's 108).
    """
    return MULTI if _has_stages(backbone) else (None,)


def _forward_ms(context: FitContext) -> float:
    """Milliseconds per image of the backbone's forward pass, timed on one training batch."""
    paths = [path for path, _ in context.splits["train"][: context.batch_size]]
    images = torch.from_numpy(load_images(paths, context.backbone.preprocessing, limit=len(paths)))
    embedder = context.embedder
    embedder.eval()
    with torch.inference_mode():
        embedder(images[:2])  # warm-up: first-call allocations
        start = time.perf_counter()
        embedder(images)
    return 1000 * (time.perf_counter() - start) / len(images)


def _frozen_score(
    context: FitContext, name: str, fitted: FittedHead, seconds: float, serve_ms: float
) -> Score:
    held = fitted.calibration
    if held is None:  # a class with one image: no folds, nothing to score on
        raise DataError(f"auto needs two training images per class to score {name}")
    paths = [str(p) for p in context.features("train", fitted.layer).paths]
    return Score(
        name=name,
        rows=tuple(paths),
        correct=held.logits.argmax(axis=1) == held.labels,
        cost=_COST.get(name, _EARLIER_COST),
        protocol=f"{fitted.params.get('folds', '?')}-fold CV on {len(paths)} training images",
        train_seconds=seconds,
        serve_ms_per_image=serve_ms,
        serve_cost_source="estimated from the backbone's measured forward time",
        figures={k: v for k, v in fitted.params.items() if k in ("C", "layer", "iterations")},
    )


def _trained_score(name: str, run: BackboneRun, serve_ms: float) -> Score:
    return Score(
        name=name,
        rows=run.data.val_rows,
        correct=run.val_correct(),
        cost=_TRAINED_COST[name],
        protocol=f"{len(run.data.val_rows)} validation images held out of train, "
        f"best of {run.epochs_done} epochs",
        train_seconds=run.train_seconds + run.data.seconds,
        serve_ms_per_image=serve_ms,
        serve_cost_source="estimated from the backbone's measured forward time",
        figures={"epochs": run.epochs_done, "best_epoch": run.stopper.best_epoch},
    )


def _progress(context: FitContext, what: str) -> None:
    left = context.seconds_left()
    log.info("auto [%s]: %s", "no budget" if math.isinf(left) else f"{left:.0f} s left", what)
