"""What :func:`~tlserve.training.train` returns: a view of the run's record and where it went."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tlserve.contract.card import ModelCard
from tlserve.contract.rules import MODEL_FILE
from tlserve.training.features.extract import SkippedFile
from tlserve.training.report.record import RunRecord
from tlserve.training.report.sections import Candidate, candidates_table

__all__ = ["TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """What a training run published and how good it is.

    ``held_out`` says what ``test_accuracy`` was measured on: the ``test/``
    folder (``"test"``) or a stratified split of the training images
    (``"split"``). ``strategy`` is the one that made the model (for ``auto``,
    the one it chose; ``reason`` says why, ``candidates`` are what it
    scored). ``params`` are its choices. Everything is read from ``record``.
    """

    record: RunRecord
    version_dir: Path
    wall_seconds: float

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def version(self) -> int:
        return int(self.version_dir.name)

    @property
    def model_path(self) -> Path:
        return self.version_dir / MODEL_FILE

    @property
    def card(self) -> ModelCard:
        assert self.record.card is not None  # train() builds it before it returns
        return self.record.card

    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.labels

    @property
    def backbone(self) -> str:
        return self.card.backbone

    @property
    def strategy(self) -> str:
        return self.record.chosen.strategy

    @property
    def reason(self) -> str:
        return self.record.chosen.reason

    @property
    def params(self) -> Mapping[str, float | int | str]:
        return self.record.chosen.params

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return self.record.candidates

    @property
    def held_out(self) -> Literal["test", "split"]:
        return self.record.data.held_out

    @property
    def n_train(self) -> int:
        return self.record.data.n_train

    @property
    def skipped(self) -> tuple[SkippedFile, ...]:
        return self.record.data.skipped

    @property
    def n_test(self) -> int:
        test = self.record.evaluation.get("test")
        return test.n if test else 0

    @property
    def test_accuracy(self) -> float | None:
        test = self.record.evaluation.get("test")
        return test.accuracy if test else None

    @property
    def val_accuracy(self) -> float | None:
        val = self.record.evaluation.get("val")
        return val.accuracy if val else None

    @property
    def temperature(self) -> float:
        return self.record.temperature

    @property
    def ece_before(self) -> float | None:
        return self.record.calibration.ece_before if self.record.calibration else None

    @property
    def ece_after(self) -> float | None:
        return self.record.calibration.ece_after if self.record.calibration else None

    @property
    def calibration_reason(self) -> str:
        return self.record.calibration.reason if self.record.calibration else ""

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
            by_cost = sorted(self.candidates, key=lambda c: c.cost)
            lines[1:1] = candidates_table(by_cost, winner)
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
