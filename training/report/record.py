"""One typed record of a training run: what ``report.json`` holds, built stage by stage.

``train()`` fills it as the run goes (data, the data check, the chosen
strategy and its candidates, calibration, evaluation, the OOD score, the
export check, the variants), saves it as ``report.json`` and renders
``report.md`` from it; the model card's notes and
:class:`~tlserve.training.report.result.TrainResult` are views of it.
``tlserve inspect``, the demo and ``tlserve quantize`` read it back with
:meth:`RunRecord.load`. The file keeps the keys it has always had, and a
report written before a key existed still loads (the key's default).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from tlserve.contract.card import ModelCard
from tlserve.training.artifact.export import ExportCheck
from tlserve.training.check.datacheck import DataCheck
from tlserve.training.features.extract import SkippedFile
from tlserve.training.fit.evaluate import Evaluation
from tlserve.training.report.sections import CalibrationReport, Candidate, OodRecord
from tlserve.training.report.variant_section import VariantsRecord

__all__ = ["REPORT_FILENAME", "ChosenRecord", "DataRecord", "RunRecord"]

REPORT_FILENAME = "report.json"
T = TypeVar("T")


@dataclass(frozen=True)
class DataRecord:
    """The images a run used: where, how the held-out set was made, counts, skips."""

    root: str
    held_out: Literal["test", "split"]
    counts: Mapping[str, Mapping[str, int]]
    n_train: int = 0  # images the head was trained on (skipped and held-out slice excluded)
    skipped: tuple[SkippedFile, ...] = ()


@dataclass(frozen=True)
class ChosenRecord:
    """The strategy asked for, the one that made the model, why, and its parameters."""

    requested: str
    strategy: str
    reason: str = ""
    params: Mapping[str, float | int | str] = field(default_factory=dict)
    time_budget: float | None = None
    budget_rule: str = ""  # how auto's default budget was sized ("": given, or none)
    seed: int = 0
    balanced: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    lr_curve: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class RunRecord:
    """Everything one run found and made. ``card`` is None until the card is built."""

    name: str
    data: DataRecord
    chosen: ChosenRecord
    card: ModelCard | None = None
    candidates: tuple[Candidate, ...] = ()
    evaluation: Mapping[str, Evaluation] = field(default_factory=dict)
    calibration: CalibrationReport | None = None
    data_check: DataCheck | None = None
    ood: OodRecord | None = None
    export_check: ExportCheck | None = None
    variant: VariantsRecord | None = None
    wall_seconds: float = 0.0
    quantized_from: str = ""  # set by ``tlserve quantize``: the version it started from

    @property
    def held_out_evaluation(self) -> Evaluation | None:
        """The figures on ``test`` (the ones the card reports), else on ``val``."""
        return self.evaluation.get("test") or self.evaluation.get("val")

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration else 1.0

    def card_metrics(self) -> dict[str, float]:
        """The model card's metrics: each held-out split's figures, ECE before calibration."""
        metrics = {
            f"{split}_{key}": value
            for split, e in self.evaluation.items()
            for key, value in (
                ("accuracy", e.accuracy),
                ("macro_f1", e.macro_f1),
                ("expected_calibration_error", e.expected_calibration_error),
            )
        }
        if self.calibration and self.calibration.ece_before is not None:
            metrics["uncalibrated_expected_calibration_error"] = self.calibration.ece_before
        return metrics

    def card_notes(self) -> dict[str, str]:
        """The model card's notes (strings, as ONNX metadata holds them)."""
        chosen, test = self.chosen, self.evaluation.get("test")
        notes = {
            "held_out": self.data.held_out,
            "n_train": str(self.data.n_train),
            "n_test": str(test.n if test else 0),
            "seed": str(chosen.seed),
            "temperature": f"{self.temperature:.6g}",
            "balanced": str(chosen.balanced),
        }
        if chosen.reason:
            notes |= {"selected_by": "auto", "auto_reason": chosen.reason}
        if self.candidates:
            notes["candidates"] = "; ".join(c.note() for c in self.candidates)
        return notes | {key: str(value) for key, value in chosen.params.items()}

    def summary(self) -> list[str]:
        """Held-out figures per class, calibration, wall time (``tlserve inspect`` prints them)."""
        lines = []
        test = self.evaluation.get("test")
        if test:
            lines.append(
                f"held-out   accuracy {test.accuracy:.4f}, "
                f"macro-F1 {test.macro_f1:.4f} on {test.n} images"
            )
            for name, row in test.per_class.items():
                lines.append(
                    f"  {name:<20} recall {_fmt(row.recall)}  precision {_fmt(row.precision)}"
                )
        calibration = self.calibration
        if calibration and calibration.ece_before is not None and calibration.ece_after is not None:
            lines.append(
                f"calibration T={calibration.temperature:.3f}, ECE "
                f"{calibration.ece_before:.4f} -> {calibration.ece_after:.4f}"
            )
            if calibration.reason:
                lines.append(f"  {calibration.reason}")
        return [*lines, f"wall time  {self.wall_seconds:.0f} s"]

    def to_dict(self) -> dict[str, Any]:
        chosen, data = self.chosen, self.data
        found = {
            "name": self.name,
            "card": asdict(self.card) if self.card else None,
            "strategy_requested": chosen.requested,
            "strategy": chosen.strategy,
            "reason": chosen.reason,
            "candidates": [c.to_dict() for c in self.candidates],
            "time_budget": chosen.time_budget,
            "budget_rule": chosen.budget_rule,
            "seed": chosen.seed,
            "balanced": chosen.balanced,
            "params": dict(chosen.params),
            "data": {
                "root": data.root,
                "held_out": data.held_out,
                "counts": {k: dict(v) for k, v in data.counts.items()},
                "n_train": data.n_train,
            },
            "evaluation": {k: v.to_dict() for k, v in self.evaluation.items()},
            "calibration": self.calibration.to_dict() if self.calibration else {},
            "history": chosen.history,
            "lr_curve": chosen.lr_curve,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in data.skipped],
            "data_check": self.data_check.to_dict() if self.data_check else None,
            "ood": asdict(self.ood) if self.ood else None,
            "export_check": asdict(self.export_check) if self.export_check else None,
            "variant": self.variant.to_dict() if self.variant else None,
            "wall_seconds": round(self.wall_seconds, 3),
        }
        return found | ({"quantized_from": self.quantized_from} if self.quantized_from else {})

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, default=str).encode()

    @classmethod
    def from_dict(cls, found: Mapping[str, Any]) -> RunRecord:
        card = ModelCard.from_dict(found["card"]) if found.get("card") else None
        data = found.get("data", {})
        return cls(
            name=str(found.get("name", "")),
            data=DataRecord(
                root=str(data.get("root", "")),
                held_out="test" if data.get("held_out") == "test" else "split",
                counts=data.get("counts", {}),
                n_train=int(data.get("n_train", 0)),
                skipped=tuple(
                    SkippedFile(Path(s["path"]), str(s["reason"])) for s in found.get("skipped", [])
                ),
            ),
            chosen=ChosenRecord(
                requested=str(found.get("strategy_requested", "")),
                strategy=str(found.get("strategy") or (card.strategy if card else "")),
                reason=str(found.get("reason") or ""),
                params=found.get("params", {}),
                time_budget=found.get("time_budget"),
                budget_rule=str(found.get("budget_rule") or ""),
                seed=int(found.get("seed", 0)),
                balanced=bool(found.get("balanced", False)),
                history=found.get("history") or [],
                lr_curve=[(float(a), float(b)) for a, b in found.get("lr_curve") or []],
            ),
            card=card,
            candidates=tuple(Candidate.from_dict(c) for c in found.get("candidates", [])),
            evaluation={k: Evaluation.from_dict(v) for k, v in found.get("evaluation", {}).items()},
            calibration=CalibrationReport.from_dict(found.get("calibration") or {}),
            data_check=_section(found, "data_check", DataCheck.from_dict),
            ood=_section(found, "ood", OodRecord.from_dict),
            export_check=_section(found, "export_check", lambda d: ExportCheck(**d)),
            variant=_section(found, "variant", VariantsRecord.from_dict),
            wall_seconds=float(found.get("wall_seconds", 0.0)),
            quantized_from=str(found.get("quantized_from", "")),
        )

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """``report.json`` at ``path`` (a file, or the version directory holding it)."""
        if path.is_dir():
            path = path / REPORT_FILENAME
        return cls.from_dict(json.loads(path.read_text()))


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def _section(found: Mapping[str, Any], key: str, parse: Callable[[Any], T]) -> T | None:
    """``found[key]`` read by ``parse``; None where the run had none (or predates the key)."""
    value = found.get(key)
    return parse(value) if value else None
