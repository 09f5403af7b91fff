"""``auto``: measure the data, pick one of the four transfer-learning scenarios, say why.

Figures (all from one forward pass over the training images, which the
chosen strategy then reuses from the cache):

- images per class (median and minimum);
- how ImageNet-like the images look to the pretrained classifier: its mean
  top-1 confidence and normalised entropy (when the backbone has one);
- cross-validated linear-probe accuracy on the last layer's features and on
  an earlier stage's (``earlier``).

The mapping (cs231n's table, docs/architecture.md "Training"): *different* when the earlier
stage probes better than the last by more than ``margin`` or the ImageNet
classifier is unsure (confidence < ``min_confidence``); *large* when the
median class has at least ``large_per_class`` images. small+similar →
``linear``; small+different → ``linear`` on the earlier stage; large+similar
→ ``finetune``; large+different → ``scratch`` (from pretrained weights).

One measurement is a trial: for small data that looks *different* (and has at
least ``trial_min_per_class`` images in every class) the table's answer, a
probe on earlier features, is not trusted blindly — on handwritten digits
(100 per class) training the whole network beat it by 5 points. ``scratch``
is trained (on train minus a validation slice) and kept if its validation
accuracy beats the probe's cross-validated accuracy by ``margin``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tlserve.training.layers import Layer, format_layer, parse_layer
from tlserve.training.strategies.base import FitContext, FittedHead, Strategy
from tlserve.training.strategies.finetune import FineTune, Scratch
from tlserve.training.strategies.linear import LinearProbe, fit_logistic_regression

__all__ = ["AutoStrategy", "Measurements", "choose"]

log = logging.getLogger(__name__)

_PROBE_C_GRID = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Measurements:
    per_class_median: float
    per_class_min: int
    imagenet_confidence: float | None
    imagenet_entropy: float | None
    probe_last: float | None
    probe_earlier: float | None
    earlier_layer: str

    def as_params(self) -> dict[str, float | int | str]:
        figures: dict[str, float | int | str] = {
            "auto_images_per_class_median": self.per_class_median,
            "auto_images_per_class_min": self.per_class_min,
            "auto_earlier_layer": self.earlier_layer,
        }
        for key in ("imagenet_confidence", "imagenet_entropy", "probe_last", "probe_earlier"):
            value = getattr(self, key)
            if value is not None:
                figures[f"auto_{key}"] = round(float(value), 4)
        return figures


def choose(
    m: Measurements, *, large_per_class: int, margin: float, min_confidence: float
) -> tuple[str, bool, str]:
    """(strategy, use the earlier layer, reason) for measurements ``m``."""
    gain = (
        m.probe_earlier - m.probe_last
        if m.probe_earlier is not None and m.probe_last is not None
        else None
    )
    unsure = m.imagenet_confidence is not None and m.imagenet_confidence < min_confidence
    different = (gain is not None and gain > margin) or unsure
    large = m.per_class_median >= large_per_class
    size = "large" if large else "small"
    why = [f"median {m.per_class_median:.0f} images per class ({size}: from {large_per_class})"]
    if gain is not None:
        why.append(
            f"CV probe accuracy {m.probe_last:.3f} on the last layer vs {m.probe_earlier:.3f} "
            f"on stage {m.earlier_layer} ({gain:+.3f}; 'different' above {margin:+.3f})"
        )
    if m.imagenet_confidence is not None:
        why.append(
            f"ImageNet classifier mean confidence {m.imagenet_confidence:.3f}, "
            f"normalised entropy {m.imagenet_entropy:.3f} "
            f"({'unsure' if unsure else 'confident enough'}: threshold {min_confidence})"
        )
    domain = "different from" if different else "similar to"
    if large:
        strategy, earlier = ("scratch" if different else "finetune"), False
    else:
        strategy, earlier = "linear", different
    scenario = f"{'large' if large else 'small'} data, {domain} ImageNet"
    target = f"{strategy}{' on the earlier stage' if earlier else ''}"
    return strategy, earlier, f"{scenario} → {target}. " + "; ".join(why) + "."


@dataclass
class AutoStrategy:
    """Strategy ``auto``: measure, choose among the others, and record why."""

    name: ClassVar[str] = "auto"
    earlier: Layer | str = -2
    large_per_class: int = 300
    margin: float = 0.01
    min_confidence: float = 0.15
    trial_min_per_class: int = 20
    options: dict[str, Any] = field(default_factory=dict)  # passed to finetune/scratch

    def fit(self, context: FitContext) -> FittedHead:
        earlier = parse_layer(self.earlier)
        context.probe_layers = (None, earlier)
        m = self.measure(context, earlier)
        strategy, use_earlier, reason = choose(
            m,
            large_per_class=self.large_per_class,
            margin=self.margin,
            min_confidence=self.min_confidence,
        )
        log.info("auto: %s", reason)
        if use_earlier and m.per_class_min >= self.trial_min_per_class:
            trial = self._trial(context, m, reason)
            if trial is not None:
                return trial
            reason += " A scratch trial did not beat the probe (see the log)."
        chosen: Strategy
        if strategy == "linear":
            chosen = LinearProbe(layer=earlier if use_earlier else None)
        elif strategy == "finetune":
            chosen = FineTune(**self.options)
        else:
            chosen = Scratch(**self.options)
        fitted = chosen.fit(context)
        return FittedHead(
            head=fitted.head,
            embedder=fitted.embedder,
            layer=fitted.layer,
            trained_backbone=fitted.trained_backbone,
            params={**m.as_params(), **fitted.params},
            history=fitted.history,
            extra={**fitted.extra, "strategy": chosen.name, "reason": reason},
        )

    def _trial(self, context: FitContext, m: Measurements, reason: str) -> FittedHead | None:
        """Train ``scratch``; return it if it beats the earlier-stage probe, else None."""
        probe = m.probe_earlier if m.probe_earlier is not None else 0.0
        fitted = Scratch(**self.options).fit(context)
        val = fitted.history[-1].get("val_accuracy") if fitted.history else None
        verdict = (
            f" Trial: scratch reached {val:.3f} validation accuracy vs the probe's {probe:.3f}"
            if val is not None
            else " Trial: scratch had no validation images"
        )
        log.info("auto:%s", verdict)
        if val is None or val <= probe + self.margin:
            return None
        return FittedHead(
            head=fitted.head,
            embedder=fitted.embedder,
            trained_backbone=True,
            params={**m.as_params(), "auto_trial_val_accuracy": round(val, 4), **fitted.params},
            history=fitted.history,
            extra={
                **fitted.extra,
                "strategy": Scratch.name,
                "reason": reason + verdict + " → scratch.",
            },
        )

    def measure(self, context: FitContext, earlier: Layer) -> Measurements:
        last = context.features("train", None)
        counts = np.bincount(last.labels, minlength=len(context.classes))
        confidence = entropy = None
        head = context.backbone.imagenet_head
        if head is not None and len(last.labels):
            with torch.inference_mode():
                p = torch.softmax(head(torch.from_numpy(last.embeddings)), dim=1).numpy()
            confidence = float(p.max(axis=1).mean())
            h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1) / np.log(p.shape[1])
            entropy = float(h.mean())
        probes: list[float | None] = []
        for layer in (None, earlier):
            features = context.features("train", layer)
            fit = fit_logistic_regression(
                features.embeddings,
                features.labels,
                classes=context.classes,
                c_grid=_PROBE_C_GRID,
                folds=3,
                seed=context.seed,
            )
            probes.append(fit.cv_accuracy)
        return Measurements(
            per_class_median=float(np.median(counts)),
            per_class_min=int(counts.min()),
            imagenet_confidence=confidence,
            imagenet_entropy=entropy,
            probe_last=probes[0],
            probe_earlier=probes[1],
            earlier_layer=format_layer(earlier),
        )
