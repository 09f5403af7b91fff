"""The faster variants as a run's record keeps them (``report.json``'s ``variant``).

What :class:`~tlserve.training.artifact.quantize.VariantReport` found, in the
shape ``report.json`` keeps and reads back: what was made, whether it passed
the reference-set check, and how it measured against float32 on the training
host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tlserve.training.artifact.quantize import Outcome, VariantReport
from tlserve.training.artifact.variants import Figures
from tlserve.training.report.sections import optional

__all__ = ["ReferenceCheck", "VariantOutcome", "VariantsRecord"]


@dataclass(frozen=True)
class ReferenceCheck:
    """A variant's top-1 answers on the version's reference set against float32's."""

    images: int
    accuracy: float
    float32_accuracy: float
    agreement: float
    drop_points: float
    passed: bool

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceCheck:
        return cls(
            images=int(data["images"]),
            accuracy=float(data["accuracy"]),
            float32_accuracy=float(data["float32_accuracy"]),
            agreement=float(data["agreement"]),
            drop_points=float(data["drop_points"]),
            passed=bool(data["passed"]),
        )


@dataclass(frozen=True)
class VariantOutcome:
    """One variant as checked at training time, and the verdict."""

    variant: str
    published: bool
    reason: str
    reference_check: ReferenceCheck
    agreement: float
    held_out: int
    provider: str
    host: str
    speedup: float
    speeds: Mapping[str, Figures] = field(default_factory=dict)  # float32 and the variant

    @classmethod
    def from_outcome(cls, outcome: Outcome) -> VariantOutcome:
        check, measured = outcome.check, outcome.measured
        return cls(
            variant=outcome.variant,
            published=outcome.published,
            reason=outcome.reason,
            reference_check=ReferenceCheck(
                images=check.images,
                accuracy=check.accuracy,
                float32_accuracy=check.reference_accuracy,
                agreement=check.agreement,
                drop_points=check.drop_points,
                passed=check.passed,
            ),
            agreement=measured.agreement,
            held_out=measured.held_out,
            provider=measured.provider,
            host=measured.host,
            speedup=measured.speedup,
            speeds={f.name: f for f in (measured.reference, measured.candidate)},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "published": self.published,
            "reason": self.reason,
            "reference_check": asdict(self.reference_check),
            "agreement": self.agreement,
            "held_out": self.held_out,
            "provider": self.provider,
            "host": self.host,
            "speedup": self.speedup,
            "variants": {
                name: {"accuracy": s.accuracy, "images_per_second": dict(s.images_per_second)}
                for name, s in self.speeds.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantOutcome:
        return cls(
            variant=str(data["variant"]),
            published=bool(data["published"]),
            reason=str(data.get("reason", "")),
            reference_check=ReferenceCheck.from_dict(data["reference_check"]),
            agreement=float(data["agreement"]),
            held_out=int(data["held_out"]),
            provider=str(data.get("provider", "")),
            host=str(data.get("host", "")),
            speedup=float(data["speedup"]),
            speeds={
                str(name): Figures(
                    name=str(name),
                    accuracy=optional(figures.get("accuracy")),
                    images_per_second={
                        int(batch): float(ips)
                        for batch, ips in figures.get("images_per_second", {}).items()
                    },
                )
                for name, figures in data.get("variants", {}).items()
            },
        )


@dataclass(frozen=True)
class VariantsRecord:
    """What ``--quantize`` (or ``tlserve quantize``) made, checked and published."""

    mode: str
    budget_points: float
    reference_images: int
    reference_held_out: int
    outcomes: tuple[VariantOutcome, ...] = ()

    @property
    def published(self) -> tuple[str, ...]:
        return tuple(o.variant for o in self.outcomes if o.published)

    @classmethod
    def from_report(cls, report: VariantReport) -> VariantsRecord:
        return cls(
            mode=report.mode,
            budget_points=report.budget_points,
            reference_images=report.reference_images,
            reference_held_out=report.reference_held_out,
            outcomes=tuple(VariantOutcome.from_outcome(o) for o in report.outcomes),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "budget_points": self.budget_points,
            "published": list(self.published),
            "reference": {"images": self.reference_images, "held_out": self.reference_held_out},
            "variants": [o.to_dict() for o in self.outcomes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantsRecord:
        reference = data.get("reference", {})
        return cls(
            mode=str(data["mode"]),
            budget_points=float(data["budget_points"]),
            reference_images=int(reference.get("images", 0)),
            reference_held_out=int(reference.get("held_out", 0)),
            outcomes=tuple(VariantOutcome.from_dict(o) for o in data.get("variants", [])),
        )
