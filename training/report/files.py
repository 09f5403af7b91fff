"""The evaluation report that lies next to every model version.

``report.json`` (everything, machine-readable), ``report.md`` (for a person;
embeds the PNGs), ``confusion.png``, ``calibration.png`` and, for strategies
that train, ``curves.png`` (and ``lr_finder.png`` after ``--lr auto``).
Figures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from tlserve.training.fit.selection import Score
from tlserve.training.report.thumbnails import data_check_files, data_check_markdown

__all__ = [
    "REPORT_FILENAME",
    "candidate_row",
    "candidates_note",
    "candidates_table",
    "report_files",
]

REPORT_FILENAME = "report.json"


def candidate_row(score: Score) -> dict[str, Any]:
    """One candidate ``auto`` scored, as ``report.json`` lists it."""
    low, high = score.interval
    return {
        "name": score.name,
        "val_accuracy": round(score.accuracy, 6),
        "val_interval_95": [round(low, 6), round(high, 6)],
        "val_rows": score.n,
        "protocol": score.protocol,
        "train_seconds": round(score.train_seconds, 2),
        "serve_ms_per_image": None
        if score.serve_ms_per_image is None
        else round(score.serve_ms_per_image, 3),
        "serve_cost_source": score.serve_cost_source,
        **score.figures,
    }


def candidates_table(rows: Sequence[Mapping[str, Any]], winner: str = "") -> list[str]:
    """A Markdown table of the candidates (``report.md``, and ``tlserve train``'s output)."""
    lines = [
        "| candidate | val accuracy | 95% interval | rows | train s | serve ms/image |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["val_interval_95"]
        serve = row["serve_ms_per_image"]
        mark = " (chosen)" if row["name"] == winner else ""
        lines.append(
            f"| {row['name']}{mark} | {row['val_accuracy']:.1%} | [{low:.1%}, {high:.1%}] | "
            f"{row['val_rows']} | {row['train_seconds']:.0f} | "
            f"{'n/a' if serve is None else f'{serve:.1f}'} |"
        )
    return lines


def candidates_note(scores: Sequence[Score]) -> str:
    """The candidates in one line for the model card: ``name acc [low, high] train_s; ...``."""
    parts = []
    for score in scores:
        low, high = score.interval
        parts.append(
            f"{score.name} {score.accuracy:.4f} [{low:.4f}, {high:.4f}] n={score.n} "
            f"train={score.train_seconds:.0f}s serve={score.serve_ms_per_image or 0:.1f}ms"
        )
    return "; ".join(parts)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    matrix = np.asarray(confusion)
    size = max(4.0, 0.5 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            colour = "white" if value > top / 2 else "black"
            axes.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
    axes.set_title("confusion matrix (held-out)")
    return _png(figure)


def curves_png(history: Sequence[Mapping[str, float]]) -> bytes:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "val_loss"):
        if all(key in row for row in history):
            loss_axes.plot(epochs, [row[key] for row in history], marker="o", label=key)
    for key in ("train_accuracy", "val_accuracy"):
        if all(key in row for row in history):
            acc_axes.plot(epochs, [row[key] for row in history], marker="o", label=key)
    for axes, title in ((loss_axes, "loss"), (acc_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.legend()
    return _png(figure)


def lr_png(curve: Sequence[Sequence[float]]) -> bytes:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.plot([c[0] for c in curve], [c[1] for c in curve])
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (head)")
    axes.set_ylabel("smoothed loss")
    axes.set_title("LR finder")
    return _png(figure)


def calibration_png(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> bytes:
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    for bins, label in ((before, "before (T=1)"), (after, "after temperature")):
        if bins:
            axes.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", label=label)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title("reliability (held-out)")
    axes.legend()
    return _png(figure)


def report_files(report: Mapping[str, Any], classes: Sequence[str]) -> dict[str, bytes]:
    """``report.json``, ``report.md`` and the PNGs they refer to."""
    files: dict[str, bytes] = {}
    evaluation = report["evaluation"].get("test") or report["evaluation"].get("val")
    if evaluation:
        files["confusion.png"] = confusion_png(evaluation["confusion"], classes)
    calibration = report.get("calibration") or {}
    if calibration.get("reliability_before"):
        files["calibration.png"] = calibration_png(
            calibration["reliability_before"], calibration["reliability_after"]
        )
    if report.get("history"):
        files["curves.png"] = curves_png(report["history"])
    if report.get("lr_curve"):
        files["lr_finder.png"] = lr_png(report["lr_curve"])
    files.update(data_check_files(report))  # label_issues.png, duplicates.png
    files[REPORT_FILENAME] = json.dumps(report, indent=2, default=str).encode()
    files["report.md"] = _markdown(report, evaluation, sorted(files)).encode()
    return files


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _markdown(report: Mapping[str, Any], evaluation: Any, files: Sequence[str]) -> str:
    card = report["card"]
    lines = [
        f"# {report['name']}: {card['strategy']} on {card['backbone']}",
        "",
        f"Created {card['created']}, tlserve {card['tlserve_version']}, "
        f"wall time {report['wall_seconds']:.0f} s.",
        "",
        "## Why this strategy",
        "",
        str(report.get("reason") or f"chosen by the user: {card['strategy']}"),
        "",
    ]
    if report.get("candidates"):
        winner = str(report.get("params", {}).get("auto_winner", ""))
        lines += ["## Candidates", "", *candidates_table(report["candidates"], winner), ""]
        sources = sorted({str(r["serve_cost_source"]) for r in report["candidates"]})
        protocols = "; ".join(f"{r['name']}: {r['protocol']}" for r in report["candidates"])
        lines += [f"Scored on: {protocols}. Serving cost {', '.join(sources)}.", ""]
    lines += [
        "## Data",
        "",
        f"{report['data']['root']} — held out: {report['data']['held_out']}; "
        f"{len(report['skipped'])} unreadable files skipped.",
        "",
        "| split | " + " | ".join(card["labels"]) + " |",
        "|---|" + "---|" * len(card["labels"]),
    ]
    for split, counts in report["data"]["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts[c]) for c in card["labels"]) + " |")
    if evaluation:
        lines += [
            "",
            "## Held-out results",
            "",
            f"{evaluation['n']} images: accuracy **{_pct(evaluation['accuracy'])}**, "
            f"macro-F1 {evaluation['macro_f1']:.3f}.",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for name, row in evaluation["per_class"].items():
            f1 = "n/a" if row["f1"] is None else f"{row['f1']:.3f}"
            lines.append(
                f"| {name} | {_pct(row['precision'])} | {_pct(row['recall'])} | {f1} | "
                f"{int(row['support'] or 0)} |"
            )
    calibration = report.get("calibration") or {}
    if calibration:
        lines += [
            "",
            "## Calibration",
            "",
            f"Temperature T = {calibration['temperature']:.3f}, chosen on "
            f"{calibration['fitted_on']} and folded into the exported graph. "
            f"Expected calibration error on held-out data: "
            f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after.",
        ]
        if calibration.get("ece_change_interval"):
            low, high = calibration["ece_change_interval"]
            lines[-1] += (
                " The 95% bootstrap interval of that change on these held-out images is "
                f"[{low:+.4f}, {high:+.4f}]"
                + (
                    ": within what sampling alone moves ECE on this many images."
                    if low <= 0.0 <= high
                    else "."
                )
            )
        if calibration.get("interval"):
            low, high = calibration["interval"]
            lines += [
                "",
                f"Maximum-likelihood T {calibration['fitted_temperature']:.3f}, 95% bootstrap "
                f"interval [{low:.3f}, {high:.3f}]; on held-out halves of the calibration "
                f"logits ECE was {calibration['cv_ece_t1']:.4f} at T = 1 and "
                f"{calibration['cv_ece_fitted']:.4f} with T fitted on the other half.",
            ]
        if calibration.get("reason"):
            lines += ["", f"{calibration['reason']}."]
    if report.get("params"):
        lines += ["", "## Parameters", ""]
        lines += [f"- {k}: {v}" for k, v in report["params"].items()]
    lines += data_check_markdown(report)
    lines += ["", "## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in files if name.endswith(".png")]
    return "\n".join(lines) + "\n"
