"""Model variants: the files a version may hold, its reference set, and the accuracy rule.

A version folder always holds ``model.onnx``, the float32 model (so Triton's
ONNX backend still loads the folder), and may hold faster variants of it with
the same inputs, outputs and card: ``model.int8.onnx`` (int8, full-range
weights), ``model.int8-rr.onnx`` (int8 with 7-bit weights, which do not
saturate on CPUs without VNNI) and ``model.fp16.onnx`` (for GPUs). Beside them
``reference.npz`` holds a few hundred labelled model inputs with the float32
model's probabilities on them, so any host can check a variant without the
training data.

Which variant serves is decided on the host that serves it (int8 kernels differ
by CPU: without VNNI, u8 x s8 products saturate their 16-bit intermediates).
Training applies :func:`check_accuracy` before it publishes a variant and the
server applies it again at load, on the same reference set, so a variant that
passed on the training host and fails on the serving host is never served.
"""

from __future__ import annotations

import io
import math
import platform
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import MODEL_FILE

__all__ = [
    "CPU_VARIANTS",
    "DEFAULT_BUDGET_POINTS",
    "DEFAULT_MIN_SPEEDUP",
    "GPU_VARIANTS",
    "REFERENCE_FILE",
    "REFERENCE_IMAGES",
    "SPEED_BATCHES",
    "SPEED_PASSES",
    "VARIANTS",
    "AccuracyCheck",
    "ReferenceSet",
    "check_accuracy",
    "host_cpu",
    "kind_of",
    "min_reference_images",
    "variant_file",
]

#: Every variant, float32 first. ``int8`` and ``int8-rr`` are two encodings of
#: one kind, int8: the server tries them in this order and serves the first
#: that passes, so a host where full-range weights keep accuracy gets them.
VARIANTS = ("float32", "int8", "int8-rr", "fp16")
CPU_VARIANTS = ("int8", "int8-rr")
GPU_VARIANTS = ("fp16",)
REFERENCE_FILE = "reference.npz"
#: Images in a reference set, at most: enough to resolve a 0.5-point budget
#: (200) with room, small enough to check in a second or two at load.
REFERENCE_IMAGES = 256
#: Accuracy points a variant may lose against float32 (the card may say otherwise).
DEFAULT_BUDGET_POINTS = 0.5
#: How much faster (images/s ratio) a variant must measure to be worth serving.
DEFAULT_MIN_SPEEDUP = 1.2
#: How a variant's speed is compared with float32's, at training and at load:
#: these batch sizes (a lone request, a typical batch), in this many
#: alternating passes, the median per-pass ratio at each, the smaller of them.
SPEED_BATCHES = (1, 8)
SPEED_PASSES = 3


def variant_file(variant: str) -> str:
    """The file name of ``variant`` in a version folder."""
    if variant not in VARIANTS:
        raise InvalidInput(f"unknown model variant {variant!r}; expected one of {VARIANTS}")
    return MODEL_FILE if variant == "float32" else f"model.{variant}.onnx"


def kind_of(variant: str) -> str:
    """``int8`` for either int8 encoding, else the variant itself."""
    return "int8" if variant in CPU_VARIANTS else variant


def min_reference_images(budget_points: float) -> int:
    """Images a check needs before one image's difference is within the budget."""
    return math.ceil(100 / budget_points) if budget_points > 0 else REFERENCE_IMAGES + 1


@dataclass(frozen=True)
class ReferenceSet:
    """Labelled model inputs and the float32 model's probabilities on them.

    ``images`` uint8 ``[N, H, W, 3]`` exactly as the model takes them,
    ``labels`` int64 ``[N]``, ``probabilities`` float32 ``[N, C]``.
    ``held_out`` of them come first and were not trained on; the rest are
    training images (the float32 model's accuracy there is higher, so the
    drop a variant shows there is if anything larger than on new images).
    """

    images: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    held_out: int

    def __post_init__(self) -> None:
        n = len(self.labels)
        if (
            self.images.dtype != np.uint8
            or self.images.ndim != 4
            or self.images.shape[-1] != 3
            or len(self.images) != n
            or self.probabilities.shape[:1] != (n,)
            or self.probabilities.ndim != 2
            or n == 0
        ):
            raise InvalidInput(
                "a reference set needs uint8 images [N, H, W, 3], N labels and [N, C] "
                f"probabilities with N >= 1; got {self.images.dtype} {list(self.images.shape)}, "
                f"{list(self.labels.shape)}, {list(self.probabilities.shape)}"
            )

    @property
    def reference_top1(self) -> np.ndarray:
        """The float32 model's top-1 class per image."""
        return np.asarray(self.probabilities.argmax(axis=1), dtype=np.int64)

    def to_bytes(self) -> bytes:
        """The ``.npz`` file's content (compressed)."""
        out = io.BytesIO()
        np.savez_compressed(
            out,
            images=self.images,
            labels=self.labels.astype(np.int64),
            probabilities=self.probabilities.astype(np.float32),
            held_out=np.asarray(self.held_out, dtype=np.int64),
        )
        return out.getvalue()

    @classmethod
    def load(cls, path: Path) -> ReferenceSet:
        """Read ``path``; :class:`InvalidInput` naming it when it is not a reference set."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    images=data["images"],
                    labels=np.asarray(data["labels"], dtype=np.int64),
                    probabilities=np.asarray(data["probabilities"], dtype=np.float32),
                    held_out=int(data["held_out"]),
                )
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise InvalidInput(f"{path} is not a tlserve reference set: {exc}") from exc


@dataclass(frozen=True)
class AccuracyCheck:
    """A variant's top-1 answers on a reference set against float32's and the labels."""

    variant: str
    images: int
    reference_accuracy: float
    accuracy: float
    agreement: float  # top-1 agreement with float32
    budget_points: float

    @property
    def drop_points(self) -> float:
        """Accuracy points lost against float32 (negative: gained)."""
        return 100 * (self.reference_accuracy - self.accuracy)

    @property
    def enough_images(self) -> bool:
        return self.images >= min_reference_images(self.budget_points)

    @property
    def passed(self) -> bool:
        return self.enough_images and self.drop_points <= self.budget_points

    @property
    def reason(self) -> str:
        """One sentence: the figures, and why it passed or failed."""
        figures = (
            f"{self.variant} {100 * self.accuracy:.1f}% vs float32 "
            f"{100 * self.reference_accuracy:.1f}% on {self.images} reference images, "
            f"top-1 agreement {100 * self.agreement:.1f}%"
        )
        if not self.enough_images:
            need = min_reference_images(self.budget_points)
            return (
                f"{figures}: {self.images} images cannot show a {self.budget_points:g}-point "
                f"budget (it needs {need})"
            )
        if self.drop_points > self.budget_points:
            return (
                f"{figures}: lost {self.drop_points:.2f} points, over the "
                f"{self.budget_points:g}-point budget"
            )
        return f"{figures}: within the {self.budget_points:g}-point budget"


def check_accuracy(
    reference: ReferenceSet,
    top1: np.ndarray,
    variant: str,
    budget_points: float = DEFAULT_BUDGET_POINTS,
) -> AccuracyCheck:
    """Score ``variant``'s top-1 classes on ``reference`` (the rule both sides apply)."""
    if top1.shape != reference.labels.shape:
        raise InvalidInput(
            f"{variant} gave {list(top1.shape)} answers for {len(reference.labels)} images"
        )
    return AccuracyCheck(
        variant=variant,
        images=len(reference.labels),
        reference_accuracy=float(np.mean(reference.reference_top1 == reference.labels)),
        accuracy=float(np.mean(top1 == reference.labels)),
        agreement=float(np.mean(top1 == reference.reference_top1)),
        budget_points=budget_points,
    )


#: The CPU flags int8 speed and accuracy depend on.
_INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16")


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This host's CPU model and the flags int8 depends on, e.g. ``"AMD EPYC 7B13 [avx2]"``."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        lines = cpuinfo.read_text().splitlines()[:40]  # the first CPU's entry
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        model, flags = info.get("model name", model), set(info.get("flags", "").split())
    except OSError:
        pass
    found = [flag for flag in _INT8_FLAGS if flag in flags]
    return f"{model} [{' '.join(found) or 'none of ' + '/'.join(_INT8_FLAGS)}]"
