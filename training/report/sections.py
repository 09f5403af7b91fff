"""Sections of a run's record that stages produce: candidates, calibration, out-of-distribution.

Each is a frozen dataclass that writes the keys ``report.json`` has always
had (:meth:`to_dict`) and reads them back (:meth:`from_dict`), tolerating the
keys an older report lacks, so a reader never indexes the file by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlserve.training.check.ood import METHOD, OodScorer
from tlserve.training.fit.calibration import Calibration, ece_change_interval
from tlserve.training.fit.evaluate import Evaluation
from tlserve.training.fit.selection import Score

__all__ = [
    "CalibrationReport",
    "Candidate",
    "OodRecord",
    "calibration_report",
    "candidates_table",
    "optional",
]

_CANDIDATE_KEYS = (
    "name",
    "val_accuracy",
    "val_interval_95",
    "val_rows",
    "protocol",
    "train_seconds",
    "serve_ms_per_image",
    "serve_cost_source",
    "cost",
)


def optional(value: Any) -> float | None:
    """A JSON number that may be null."""
    return None if value is None else float(value)


def _pair(value: Any) -> tuple[float, float] | None:
    return None if not value else (float(value[0]), float(value[1]))


@dataclass(frozen=True)
class Candidate:
    """One candidate ``auto`` scored: validation accuracy, its interval, costs."""

    name: str
    val_accuracy: float
    val_interval_95: tuple[float, float]
    val_rows: int
    protocol: str = ""
    train_seconds: float = 0.0
    serve_ms_per_image: float | None = None
    serve_cost_source: str = ""
    cost: float = 0.0  # orders candidates for ties: lower is cheaper
    figures: Mapping[str, float | int | str] = field(default_factory=dict)

    @classmethod
    def from_score(cls, score: Score) -> Candidate:
        low, high = score.interval
        serve = score.serve_ms_per_image
        return cls(
            name=score.name,
            val_accuracy=round(score.accuracy, 6),
            val_interval_95=(round(low, 6), round(high, 6)),
            val_rows=score.n,
            protocol=score.protocol,
            train_seconds=round(score.train_seconds, 2),
            serve_ms_per_image=None if serve is None else round(serve, 3),
            serve_cost_source=score.serve_cost_source,
            cost=score.cost,
            figures=dict(score.figures),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "val_accuracy": self.val_accuracy,
            "val_interval_95": list(self.val_interval_95),
            "val_rows": self.val_rows,
            "protocol": self.protocol,
            "train_seconds": self.train_seconds,
            "serve_ms_per_image": self.serve_ms_per_image,
            "serve_cost_source": self.serve_cost_source,
            "cost": self.cost,
            **self.figures,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        low, high = data["val_interval_95"]
        return cls(
            name=str(data["name"]),
            val_accuracy=float(data["val_accuracy"]),
            val_interval_95=(float(low), float(high)),
            val_rows=int(data["val_rows"]),
            protocol=str(data.get("protocol", "")),
            train_seconds=float(data.get("train_seconds", 0.0)),
            serve_ms_per_image=optional(data.get("serve_ms_per_image")),
            serve_cost_source=str(data.get("serve_cost_source", "")),
            cost=float(data.get("cost", 0.0)),
            figures={k: v for k, v in data.items() if k not in _CANDIDATE_KEYS},
        )

    def note(self) -> str:
        """This candidate in a few words, for the model card."""
        low, high = self.val_interval_95
        return (
            f"{self.name} {self.val_accuracy:.4f} [{low:.4f}, {high:.4f}] n={self.val_rows} "
            f"train={self.train_seconds:.0f}s serve={self.serve_ms_per_image or 0:.1f}ms"
        )


@dataclass(frozen=True)
class CalibrationReport:
    """``T``, why, and the held-out ECE before and after it (``report.json``'s ``calibration``).

    ``calibration`` is None when there was nothing to fit ``T`` on (``T = 1``).
    """

    calibration: Calibration | None
    ece_before: float | None
    ece_after: float | None
    reliability_before: list[list[float]] = field(default_factory=list)
    reliability_after: list[list[float]] = field(default_factory=list)
    ece_change_interval: tuple[float, float] | None = None

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration else 1.0

    @property
    def reason(self) -> str:
        return self.calibration.reason if self.calibration else ""

    def to_dict(self) -> dict[str, Any]:
        change = self.ece_change_interval
        return {
            "temperature": 1.0,
            "fitted_on": "nothing (T = 1)",
            **(self.calibration.to_dict() if self.calibration else {}),
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "ece_change_interval": list(change) if change else None,
            "reliability_before": self.reliability_before,
            "reliability_after": self.reliability_after,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationReport | None:
        if not data:
            return None
        calibration = None
        if "n" in data:  # a fitted (or kept) T, with the figures behind it
            calibration = Calibration(
                temperature=float(data["temperature"]),
                n=int(data["n"]),
                reason=str(data.get("reason", "")),
                fitted_on=str(data.get("fitted_on", "")),
                fitted_temperature=optional(data.get("fitted_temperature")),
                interval=_pair(data.get("interval")),
                cv_ece_t1=optional(data.get("cv_ece_t1")),
                cv_ece_fitted=optional(data.get("cv_ece_fitted")),
            )
        return cls(
            calibration=calibration,
            ece_before=optional(data.get("ece_before")),
            ece_after=optional(data.get("ece_after")),
            reliability_before=data.get("reliability_before") or [],
            reliability_after=data.get("reliability_after") or [],
            ece_change_interval=_pair(data.get("ece_change_interval")),
        )


def calibration_report(
    calibration: Calibration | None,
    before: Evaluation | None,
    after: Evaluation | None,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    seed: int = 0,
) -> CalibrationReport | None:
    """The calibration section: ``T``, and the held-out ECE before and after it.

    With the uncalibrated ``held_out`` logits and labels, also the 95% interval
    of the ECE change: on a few hundred test images ECE moves by a few points
    from sampling alone, and the report should say so. None when there is
    neither a ``T`` nor held-out figures.
    """
    if calibration is None and (before is None or after is None):
        return None
    temperature = calibration.temperature if calibration else 1.0
    change = None
    if held_out is not None and temperature != 1.0:
        change = ece_change_interval(*held_out, temperature, seed=seed)
    return CalibrationReport(
        calibration=calibration,
        ece_before=before.expected_calibration_error if before else None,
        ece_after=after.expected_calibration_error if after else None,
        reliability_before=before.reliability if before else [],
        reliability_after=after.reliability if after else [],
        ece_change_interval=change,
    )


@dataclass(frozen=True)
class OodRecord:
    """The out-of-distribution score the model carries: how it was fitted, its threshold."""

    method: str
    n_fitted: int
    n_classes: int
    threshold: float | None
    n_threshold: int
    auroc: float | None = None

    @classmethod
    def from_scorer(cls, scorer: OodScorer) -> OodRecord:
        return cls(
            method=METHOD,
            n_fitted=scorer.n_fitted,
            n_classes=len(scorer.centres),
            threshold=scorer.threshold,
            n_threshold=scorer.n_threshold,
            auroc=scorer.auroc,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OodRecord:
        return cls(
            method=str(data.get("method", "")),
            n_fitted=int(data.get("n_fitted", 0)),
            n_classes=int(data.get("n_classes", 0)),
            threshold=optional(data.get("threshold")),
            n_threshold=int(data.get("n_threshold", 0)),
            auroc=optional(data.get("auroc")),
        )


def candidates_table(candidates: Sequence[Candidate], winner: str = "") -> list[str]:
    """A Markdown table of the candidates (``report.md``, and ``tlserve train``'s output)."""
    lines = [
        "| candidate | val accuracy | 95% interval | rows | train s | serve ms/image |",
        "|---|---|---|---|---|---|",
    ]
    for row in candidates:
        low, high = row.val_interval_95
        serve = row.serve_ms_per_image
        mark = " (chosen)" if row.name == winner else ""
        lines.append(
            f"| {row.name}{mark} | {row.val_accuracy:.1%} | [{low:.1%}, {high:.1%}] | "
            f"{row.val_rows} | {row.train_seconds:.0f} | "
            f"{'n/a' if serve is None else f'{serve:.1f}'} |"
        )
    return lines
