"""The four transfer-learning scenarios (small/large data x similar/different from ImageNet).

cs231n's table: *different* when an earlier stage probes better than the
last by more than ``margin`` or the ImageNet classifier is unsure of the
images (mean top-1 confidence below ``min_confidence``); *large* when the
median class has at least ``large_per_class`` images. small+similar →
``linear``; small+different → ``linear`` on an earlier stage; large+similar →
``finetune``; large+different → ``scratch`` (from pretrained weights).
``auto`` measures instead of trusting this table; it only uses the answer to
decide which trained-backbone candidate to try first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tlserve.training.fit.strategies.base import FitContext

__all__ = ["Measurements", "choose", "measure"]

log = logging.getLogger(__name__)


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
    """(strategy, use the earlier layer, reason): the four-scenario table's answer for ``m``.

    ``auto`` uses it only to order its trained-backbone candidates.
    """
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


def measure(
    context: FitContext, probe_last: float | None, probe_earlier: float | None, earlier: str
) -> Measurements:
    """Images per class and how ImageNet-like the training images look."""
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
    return Measurements(
        per_class_median=float(np.median(counts)),
        per_class_min=int(counts.min()),
        imagenet_confidence=confidence,
        imagenet_entropy=entropy,
        probe_last=probe_last,
        probe_earlier=probe_earlier,
        earlier_layer=earlier,
    )
