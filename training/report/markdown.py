"""``report.md``: a run's record for a person, with the figures embedded."""

from __future__ import annotations

from collections.abc import Sequence

from tlserve.training.fit.evaluate import Evaluation
from tlserve.training.report.record import RunRecord
from tlserve.training.report.sections import CalibrationReport, candidates_table
from tlserve.training.report.thumbnails import data_check_markdown

__all__ = ["report_markdown"]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def report_markdown(record: RunRecord, files: Sequence[str]) -> str:
    """The report: why this strategy, candidates, data, results, calibration, data check."""
    card, chosen, data = record.card, record.chosen, record.data
    labels = card.labels if card else ()
    lines = [
        f"# {record.name}: {chosen.strategy} on {card.backbone if card else '?'}",
        "",
        f"Created {card.created if card else '?'}, tlserve {card.tlserve_version if card else '?'}"
        f", wall time {record.wall_seconds:.0f} s.",
        "",
        "## Why this strategy",
        "",
        chosen.reason or f"chosen by the user: {chosen.strategy}",
        "",
    ]
    if chosen.time_budget is not None:
        rule = (
            f" (auto's default for this data: {chosen.budget_rule})" if chosen.budget_rule else ""
        )
        lines += [f"Time budget {chosen.time_budget:.0f} s{rule}.", ""]
    if record.candidates:
        winner = str(chosen.params.get("auto_winner", ""))
        lines += ["## Candidates", "", *candidates_table(record.candidates, winner), ""]
        sources = sorted({c.serve_cost_source for c in record.candidates})
        protocols = "; ".join(f"{c.name}: {c.protocol}" for c in record.candidates)
        lines += [f"Scored on: {protocols}. Serving cost {', '.join(sources)}.", ""]
    lines += [
        "## Data",
        "",
        f"{data.root} — held out: {data.held_out}; {len(data.skipped)} unreadable files skipped.",
        "",
        "| split | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for split, counts in data.counts.items():
        lines.append(f"| {split} | " + " | ".join(str(counts[c]) for c in labels) + " |")
    if record.held_out_evaluation:
        lines += _results(record.held_out_evaluation)
    if record.calibration:
        lines += _calibration(record.calibration)
    if chosen.params:
        lines += ["", "## Parameters", ""]
        lines += [f"- {k}: {v}" for k, v in chosen.params.items()]
    lines += data_check_markdown(record.data_check)
    lines += ["", "## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in files if name.endswith(".png")]
    return "\n".join(lines) + "\n"


def _results(evaluation: Evaluation) -> list[str]:
    lines = [
        "",
        "## Held-out results",
        "",
        f"{evaluation.n} images: accuracy **{_pct(evaluation.accuracy)}**, "
        f"macro-F1 {evaluation.macro_f1:.3f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, row in evaluation.per_class.items():
        f1 = "n/a" if row.f1 is None else f"{row.f1:.3f}"
        lines.append(
            f"| {name} | {_pct(row.precision)} | {_pct(row.recall)} | {f1} | {row.support} |"
        )
    return lines


def _calibration(report: CalibrationReport) -> list[str]:
    fitted = report.calibration
    lines = [
        "",
        "## Calibration",
        "",
        f"Temperature T = {report.temperature:.3f}, chosen on "
        f"{fitted.fitted_on if fitted else 'nothing (T = 1)'} and folded into the exported "
        f"graph. Expected calibration error on held-out data: "
        f"{_figure(report.ece_before)} before, {_figure(report.ece_after)} after.",
    ]
    if report.ece_change_interval:
        low, high = report.ece_change_interval
        lines[-1] += (
            " The 95% bootstrap interval of that change on these held-out images is "
            f"[{low:+.4f}, {high:+.4f}]"
            + (
                ": within what sampling alone moves ECE on this many images."
                if low <= 0.0 <= high
                else "."
            )
        )
    if fitted and fitted.interval:
        low, high = fitted.interval
        lines += [
            "",
            f"Maximum-likelihood T {_figure(fitted.fitted_temperature, 3)}, 95% bootstrap "
            f"interval [{low:.3f}, {high:.3f}]; on held-out halves of the calibration "
            f"logits ECE was {_figure(fitted.cv_ece_t1)} at T = 1 and "
            f"{_figure(fitted.cv_ece_fitted)} with T fitted on the other half.",
        ]
    if report.reason:
        lines += ["", f"{report.reason}."]
    return lines


def _figure(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
