"""What :func:`~tlserve.training.train` returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tlserve.contract.card import ModelCard
from tlserve.training.features.extract import SkippedFile
from tlserve.training.fit.selection import Score
from tlserve.training.report.files import candidate_row, candidates_table

__all__ = ["TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """What a training run published and how good it is.

    ``held_out`` says what ``test_accuracy`` was measured on: the ``test/``
    folder (``"test"``) or a stratified split of the training images
    (``"split"``). ``strategy`` is the one that made the model (for ``auto``,
    the one it chose; ``reason`` says why, ``candidates`` are what it
    scored). ``params`` are its choices.
    """

    name: str
    version: int
    version_dir: Path
    model_path: Path
    classes: tuple[str, ...]
    backbone: str
    strategy: str
    held_out: Literal["test", "split"]
    n_train: int
    n_test: int
    test_accuracy: float | None
    val_accuracy: float | None
    params: Mapping[str, float | int | str]
    skipped: tuple[SkippedFile, ...]
    card: ModelCard
    wall_seconds: float
    reason: str = ""
    temperature: float = 1.0
    ece_before: float | None = None
    ece_after: float | None = None
    calibration_reason: str = ""
    candidates: tuple[Score, ...] = ()

    def summary(self) -> str:
        """A few lines for a person: accuracy, where the model went, what was skipped."""
        where = "test/" if self.held_out == "test" else "a held-out split"
        accuracy = "n/a" if self.test_accuracy is None else f"{self.test_accuracy:.1%}"
        lines = [
            f"held-out accuracy on {where}: {accuracy} ({self.n_test} images, "
            f"{len(self.classes)} classes; trained on {self.n_train})",
            f"strategy {self.strategy} on {self.backbone}: "
            + ", ".join(f"{k}={v}" for k, v in self.params.items()),
            f"published {self.name} version {self.version}: {self.model_path}",
            f"wall time {self.wall_seconds:.0f} s",
        ]
        if self.reason:
            lines.insert(1, f"auto: {self.reason}")
        if self.candidates:
            winner = str(self.params.get("auto_winner", ""))
            rows = [candidate_row(s) for s in sorted(self.candidates, key=lambda s: s.cost)]
            lines[1:1] = candidates_table(rows, winner)
        if self.ece_before is not None and self.ece_after is not None:
            lines.insert(
                1,
                f"calibration: T={self.temperature:.3f}, held-out ECE "
                f"{self.ece_before:.4f} -> {self.ece_after:.4f}"
                + (f" ({self.calibration_reason})" if self.calibration_reason else ""),
            )
        if self.val_accuracy is not None:
            lines.insert(1, f"validation accuracy: {self.val_accuracy:.1%}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable files, e.g. {self.skipped[0]}")
        return "\n".join(lines)
