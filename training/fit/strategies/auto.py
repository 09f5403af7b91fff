"""``auto``: try the candidates on one validation protocol, keep the measured best, say why.

First the input geometry (:meth:`AutoStrategy._geometry`): the last-layer
probe at the backbone's resize and centre crop, at the whole image, and at a
larger size when the images have the pixels for it, on the same folds; the
winner's geometry is used from then on and exported in the model card.

Candidates, cheapest first:

1. ``linear`` on the last layer, on an earlier stage (``earlier``) and on
   the pooled stages concatenated (``multi``): scored out of fold on the
   same stratified folds of the training images, all from one forward pass;
   and, when two or more of them are within noise of the best,
   ``linear@combined``, their average (:mod:`~tlserve.training.fit.strategies.ties`);
2. ``trees`` on the last layer, on the same folds, if the time budget allows
   (its cost is projected from one timed fit);
3. ``finetune`` and ``scratch``, scored on one validation slice held out of
   train, raced by successive halving: each trains ``rung_epochs``, only the
   leader continues (to twice as many epochs, and so on, with early
   stopping, up to the recipe's ``epochs``), and no epoch starts that the
   measured pace says would end after the budget. The four-scenario table
   (:mod:`~tlserve.training.fit.strategies.scenarios`) only decides which of
   the two goes first.

The winner is chosen by :func:`~tlserve.training.fit.selection.select`: the best
on common validation rows, or the best of a cheaper kind within one
standard error of it. Frozen-feature winners are refitted on every training image; a
trained-backbone winner keeps its best epoch (its held-out slice calibrates
it). Serving cost is the backbone's forward time measured here (torch, one
batch), plus trees' measured predict time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tlserve.training.backbone.backbones import Backbone
from tlserve.training.backbone.layers import MULTI, Layer, Layers, format_layer, parse_layer
from tlserve.training.fit.heads import head_logits
from tlserve.training.fit.selection import Score, select
from tlserve.training.fit.strategies.base import FitContext, FittedHead
from tlserve.training.fit.strategies.budget import EMBED_PER_FORWARD, TRAIN_STEP_FORWARDS
from tlserve.training.fit.strategies.finetune import FineTune, Scratch
from tlserve.training.fit.strategies.geometry import describe_geometry, measure_geometry
from tlserve.training.fit.strategies.linear import LinearProbe
from tlserve.training.fit.strategies.recipe import Recipe
from tlserve.training.fit.strategies.run import BackboneRun
from tlserve.training.fit.strategies.scenarios import choose, measure
from tlserve.training.fit.strategies.scoring import (
    COMBINED,
    forward_ms,
    frozen_score,
    log_candidates,
    progress,
)
from tlserve.training.fit.strategies.ties import combine_candidate
from tlserve.training.fit.strategies.trees import TreeProbe
from tlserve.training.fit.strategies.validation import prepare_run_images

__all__ = ["AutoStrategy", "probe_layers"]

log = logging.getLogger(__name__)

_TRAINED_COST = {"finetune": 3.0, "scratch": 3.1}
# One trees fit, per training row and class, projected before timing one: on
# 2 loaded cores 1,000 rows of 10 classes took 45-60 s, 1,500 over 3 minutes.
_TREE_SECONDS_PER_ROW_CLASS = 0.01
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
        progress(context, f"embedding {len(context.splits['train'])} training images")
        serve_ms = forward_ms(context)
        reserve = _EXPORT_SECONDS + EMBED_PER_FORWARD * serve_ms / 1000 * sum(
            len(context.splits.get(s, [])) for s in ("val", "test")
        )
        deadline = None if context.deadline is None else context.deadline - reserve
        notes: list[str] = []
        # The input geometry first: the last-layer probe at each, on the same folds.
        fits: dict[str, FittedHead] = {}
        scores: list[Score] = []
        geometry = measure_geometry(context, self.folds, serve_ms, deadline, notes)
        fits["linear"], linear_score = geometry.fitted, geometry.score
        scores.append(linear_score)
        if geometry.forward_ms is not None:
            serve_ms = geometry.forward_ms
        for name, layer in frozen[1:]:
            progress(context, f"trying {name} ({self.folds}-fold CV)")
            started = time.perf_counter()
            fitted = LinearProbe(layer=layer, folds=self.folds).fit(context)
            fits[name] = fitted
            seconds = time.perf_counter() - started
            scores.append(frozen_score(context, name, fitted, seconds, serve_ms))
        combined = combine_candidate(context, fits, scores, serve_ms, notes)
        if combined is not None:
            fits[COMBINED], score = combined
            scores.append(score)
        probes = {s.name: s.accuracy for s in scores}
        earlier_name = f"linear@{format_layer(earlier)}"
        m = measure(context, probes.get("linear"), probes.get(earlier_name), format_layer(earlier))
        prior, _, scenario = choose(
            m,
            large_per_class=self.large_per_class,
            margin=self.margin,
            min_confidence=self.min_confidence,
        )
        notes.insert(0, f"Four-scenario table: {scenario}")
        order = sorted(self.trained, key=lambda n: (n != prior, _TRAINED_COST.get(n, 9.0)))
        if self.trees:
            progress(context, "trying trees (if one fit and its folds fit in the budget)")
            # Trees never take the time the race needs (every candidate's first
            # rung and the leader's second), when it can run at all.
            rung = self._first_rung(context, serve_ms) if order else 0.0
            left = math.inf if deadline is None else deadline - time.monotonic()
            race = rung * (len(order) + 1) if rung <= left else 0.0
            before = None if deadline is None else deadline - race
            tree = self._trees(context, serve_ms, before, notes)
            if tree is not None:
                fits["trees"], score = tree
                scores.append(score)
        probe_c = float(fits["linear"].params["C"])
        runs = self._race(context, order, probe_c, serve_ms, deadline, notes) if order else {}
        scores += [_trained_score(name, run, serve_ms) for name, run in runs.items()]
        selection = select(scores)
        winner = selection.winner.name
        chosen = runs[winner].finish() if winner in runs else fits[winner]
        reason = f"{selection.reason}. " + " ".join(notes)
        log.info("auto: %s", reason)
        log_candidates([*scores, *geometry.others])
        spec = context.backbone.preprocessing
        return FittedHead(
            head=chosen.head,
            embedder=chosen.embedder,
            strategy=chosen.strategy,
            layer=chosen.layer,
            trained_backbone=chosen.trained_backbone,
            params={
                **m.as_params(),
                "auto_winner": winner,
                "geometry": describe_geometry(spec),
                **chosen.params,
            },
            history=chosen.history,
            calibration=chosen.calibration,
            skipped=chosen.skipped,
            lr_curve=chosen.lr_curve,
            val_images=chosen.val_images,
            reason=reason,
            candidates=(*scores, *geometry.others),
        )

    def _trees(
        self, context: FitContext, serve_ms: float, deadline: float | None, notes: list[str]
    ) -> tuple[FittedHead, Score] | None:
        started = time.perf_counter()
        left = math.inf if deadline is None else deadline - time.monotonic()
        # Not even one timed fit without time for all the folds': it alone can take minutes.
        n_train = len(context.splits["train"])
        classes = len(context.classes) if len(context.classes) > 2 else 1
        one_fit = _TREE_SECONDS_PER_ROW_CLASS * n_train * classes
        fitted = (
            TreeProbe(folds=self.folds).fit_within(context, left)
            if left > (self.folds + 1) * one_fit
            else None
        )
        if fitted is None:
            notes.append("trees not scored: its cross-validation would pass the time budget.")
            return None
        seconds = time.perf_counter() - started
        rows = context.features("train").embeddings[:256]
        t0 = time.perf_counter()
        head_logits(fitted.head, rows)
        predict_ms = 1000 * (time.perf_counter() - t0) / max(1, len(rows))
        return fitted, frozen_score(context, "trees", fitted, seconds, serve_ms + predict_ms)

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
        first = self._first_rung(context, serve_ms)
        left = math.inf if deadline is None else deadline - time.monotonic()
        if first > left:
            notes.append(
                f"Time budget spent after the cheap candidates ({max(left, 0):.0f} s left): "
                f"{', '.join(order)} not tried; {self.rung_epochs} epochs of one were "
                f"projected at {first:.0f} s from the measured forward time "
                "(raise --time-budget to try them)."
            )
            progress(context, notes[-1])
            return {}
        data = prepare_run_images(context, FineTune.val_fraction)
        runs: dict[str, BackboneRun] = {}
        recipes = {"finetune": FineTune(**self.options), "scratch": Scratch(**self.options)}
        for name in order:
            progress(context, f"trying {name}: {self.rung_epochs} epochs")
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
                progress(context, f"continuing {name} to epoch {run.epochs_done + epochs}")
                run.advance(epochs, deadline)
            alive = [n for n in alive if not runs[n].done and runs[n].epochs_done >= target]
        return runs

    @property
    def leader_epochs(self) -> int:
        """Epochs the race's leader may train to: the recipe's (``options`` may set them)."""
        return int(self.options.get("epochs", Recipe.epochs))

    def _first_rung(self, context: FitContext, serve_ms: float) -> float:
        """Seconds projected for one trained candidate's first ``rung_epochs``."""
        n_train = len(context.splits["train"])
        return TRAIN_STEP_FORWARDS * serve_ms / 1000 * n_train * self.rung_epochs

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
