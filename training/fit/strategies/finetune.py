"""Train the backbone: ``finetune`` (probe head, then unfreeze) and ``scratch`` (everything).

``finetune`` follows linear-probe-then-fine-tune (Kumar et al., 2022): the
head starts as the logistic regression fitted on the frozen features (so a
random head never sends large gradients into pretrained layers and distorts
them), then the backbone unfreezes (the last ``unfreeze`` layer groups, or
all) and trains with AdamW, timm's cosine schedule with warmup, and
discriminative learning rates (head ``lr``; backbone ``lr *
backbone_lr_mult``, decaying by ``layer_decay`` per layer group towards the
stem, timm's layer-wise decay), augmentation chosen for
the data (``augment="auto"``: crops on grayscale images, crops and colour
jitter on colour ones; flips only when asked, see
:class:`~tlserve.training.fit.loops.Augment`). It runs at the backbone's native
resolution unless ``train(image_size=...)`` says otherwise.

Epochs are chosen by early stopping on a validation slice held out of train
(or ``val/``): at most ``epochs``, ending ``patience`` epochs after the best
one, whose weights are restored. BatchNorm policy: ``bn="frozen"`` (default
for ``finetune``) keeps every BatchNorm on its pretrained running statistics
(Keras's inference-mode BN); ``"train"`` updates them in the unfrozen layers.

``scratch`` trains the whole network at one LR with BatchNorm training, from
the pretrained weights (default) or from random init (``pretrained=False``).

On a GPU when there is one; ``precision`` (default ``auto``: bfloat16 autocast
on a GPU, on a CPU only where measured faster on it) is set out in
:mod:`tlserve.training.fit.precision`. Both run under ``torchrun`` unchanged
(DistributedDataParallel, each rank on its slice). A checkpoint is written
every epoch; ``resume`` continues from it. Under a time budget
(``FitContext.deadline``) the schedule is shortened to the epochs that fit
at the measured pace, and training stops before an epoch that would end
after it, keeping the best epoch so far. The probe is epoch 0, and a moving
average of the weights competes with them every epoch
(:mod:`~tlserve.training.fit.strategies.averaging`); docs/training.md sets
out the recipe and what it measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tlserve.training.fit.strategies.base import FitContext, FittedHead
from tlserve.training.fit.strategies.recipe import Recipe
from tlserve.training.fit.strategies.run import BackboneRun
from tlserve.training.fit.strategies.validation import prepare_run_images

__all__ = ["FineTune", "Scratch"]


@dataclass
class FineTune(Recipe):
    """Strategy ``finetune``: probe the head, then unfreeze with discriminative LRs."""

    name: ClassVar[str] = "finetune"

    def fit(self, context: FitContext) -> FittedHead:
        run = BackboneRun(self, context, prepare_run_images(context, self.val_fraction))
        run.advance(self.epochs, context.deadline)
        return run.finish()


@dataclass
class Scratch(FineTune):
    """Strategy ``scratch``: the whole network at one LR, BatchNorm training.

    From the pretrained weights by default (cs231n: "in practice initialise
    from pretrained"); ``pretrained=False`` starts from random weights.
    """

    name: ClassVar[str] = "scratch"
    lr: float | str = 1e-3
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    bn: str = "train"
    probe_head: bool = False
    label_smoothing: float = 0.1  # a random head: smoothing keeps its first logits modest
