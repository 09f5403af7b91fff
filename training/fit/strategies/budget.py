"""``auto``'s default time budget on a CPU: sized to the data, printed before it is spent.

``--time-budget`` always wins. Without it, the budget is the sum of what
``auto`` is projected to need, from the training image count and the
backbone's forward time measured on this machine (one batch, ms per image):

- *frozen*: :data:`FROZEN_SECONDS` (exporting the embedder and checking
  it, the linear heads' cross-validation) plus :data:`FROZEN_PASSES` passes
  over every image (the first embedding, the whole-image geometry
  candidate, the held-out images again if it wins), each image at
  :data:`EMBED_PER_FORWARD` of the measured forward time (the embedding
  runs through onnxruntime, the timed forward through torch);
- *trained*, only when the data is large enough for a trained backbone to
  gain over a probe: at least :data:`TRAINED_MIN_IMAGES` training images and
  :data:`TRAINED_MIN_PER_CLASS` per class on average (the four-scenario
  table's "large" is 300 per class; a candidate is worth trying at half
  that). Then :func:`race_epochs` epochs (every trained candidate's first
  rung, then the leader on to the recipe's full schedule), each projected at
  :data:`TRAIN_STEP_FORWARDS` forwards per image on the training part plus
  one forward over the validation slice.

The total is capped at :data:`CPU_CEILING_SECONDS` (15 minutes); when not
even the frozen part and one candidate's first rung fit under it, the
trained candidates are not admitted and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlserve.training.fit.strategies.base import FitContext
from tlserve.training.fit.strategies.recipe import Recipe
from tlserve.training.fit.strategies.scoring import forward_ms

__all__ = [
    "CPU_CEILING_SECONDS",
    "EMBED_PER_FORWARD",
    "FROZEN_PASSES",
    "FROZEN_SECONDS",
    "TRAINED_MIN_IMAGES",
    "TRAINED_MIN_PER_CLASS",
    "TRAIN_STEP_FORWARDS",
    "BudgetPlan",
    "default_budget",
    "plan_budget",
    "race_epochs",
]

FROZEN_SECONDS = 40.0
FROZEN_PASSES = 3.0
# An embedding pass (decode, resize, onnxruntime) per image, as a fraction of
# torch's forward time per image, measured on 2 shared cores: 0.18-0.25 at
# load 5 (the example data, 23.5 ms against 134 ms; 1,500 MNIST digits at
# 128 px, 14-18 ms against 73 ms), 0.56 at load 7-8 (55 ms against 98 ms).
EMBED_PER_FORWARD = 0.35
TRAINED_MIN_IMAGES = 1000
TRAINED_MIN_PER_CLASS = 150
CPU_CEILING_SECONDS = 900.0
# A training step (forward + backward + update) costs about three forwards.
TRAIN_STEP_FORWARDS = 3.0


@dataclass(frozen=True)
class BudgetPlan:
    """The default budget, whether it admits a trained backbone, and the sentence that says why."""

    seconds: float
    frozen_seconds: float
    trained_seconds: float
    admits_trained: bool
    reason: str


def race_epochs(candidates: int, rung_epochs: int, leader_epochs: int = Recipe.epochs) -> int:
    """Epochs ``auto``'s race needs: each candidate's first rung, then the leader on to
    ``leader_epochs`` (the recipe's schedule, early stopping may end it sooner).

    Two more epochs for the leader were too few: on mnist-medium (1,500 digits
    at 128 px, an idle 2-core host) the race's fine-tune stopped at 93.2% on
    its validation slice after 2 epochs, and lost to the stage -2 probe (95.1%
    on test), where the fine-tune run on its own reached 95.9%.
    """
    if not candidates:
        return 0
    return rung_epochs * candidates + max(0, leader_epochs - rung_epochs)


def plan_budget(
    *,
    n_train: int,
    n_classes: int,
    n_images: int,
    forward_ms: float,
    candidates: int = 2,
    rung_epochs: int = 2,
    leader_epochs: int = Recipe.epochs,
    val_fraction: float = 0.15,
) -> BudgetPlan:
    """The default budget for ``n_train`` training images (``n_images`` in all splits).

    ``forward_ms`` is the backbone's measured forward time per image;
    ``candidates`` the trained-backbone candidates ``auto`` may race.
    """
    forward = forward_ms / 1000.0
    frozen = FROZEN_SECONDS + FROZEN_PASSES * n_images * forward * EMBED_PER_FORWARD
    per_class = n_train / max(1, n_classes)
    n_val = round(n_train * val_fraction)
    epoch = TRAIN_STEP_FORWARDS * (n_train - n_val) * forward + n_val * forward
    epochs = race_epochs(candidates, rung_epochs, leader_epochs)
    head = f"frozen heads and geometry {frozen:.0f} s ({forward_ms:.0f} ms per image forward)"
    if not candidates:
        return BudgetPlan(frozen, frozen, 0.0, False, f"{head}; no trained candidate asked for")
    if n_train < TRAINED_MIN_IMAGES or per_class < TRAINED_MIN_PER_CLASS:
        return BudgetPlan(
            frozen,
            frozen,
            0.0,
            False,
            f"{head}; no trained backbone: {n_train} training images, {per_class:.0f} per "
            f"class (one is tried from {TRAINED_MIN_IMAGES} and {TRAINED_MIN_PER_CLASS} per "
            "class; --time-budget to try it anyway)",
        )
    first_rung = rung_epochs * epoch
    if frozen + first_rung > CPU_CEILING_SECONDS:
        return BudgetPlan(
            frozen,
            frozen,
            0.0,
            False,
            f"{head}; no trained backbone: {rung_epochs} epochs are projected at "
            f"{first_rung:.0f} s ({epoch:.0f} s each), past the "
            f"{CPU_CEILING_SECONDS / 60:.0f}-minute default (--time-budget to allow it)",
        )
    trained = min(epochs * epoch, CPU_CEILING_SECONDS - frozen)
    return BudgetPlan(
        frozen + trained,
        frozen,
        trained,
        True,
        f"{head} + trained backbone {trained:.0f} s ({epochs} epochs projected at {epoch:.0f} s "
        f"each; {n_train} training images, {per_class:.0f} per class), at most "
        f"{CPU_CEILING_SECONDS / 60:.0f} minutes",
    )


def default_budget(
    context: FitContext,
    *,
    candidates: int = 2,
    rung_epochs: int = 2,
    leader_epochs: int = Recipe.epochs,
) -> BudgetPlan:
    """The default budget for ``context``'s data, from the forward time of one timed batch."""
    return plan_budget(
        n_train=len(context.splits["train"]),
        n_classes=len(context.classes),
        n_images=sum(len(samples) for samples in context.splits.values()),
        forward_ms=forward_ms(context),
        candidates=candidates,
        rung_epochs=rung_epochs,
        leader_epochs=leader_epochs,
        val_fraction=Recipe.val_fraction,
    )
