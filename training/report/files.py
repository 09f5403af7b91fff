"""The evaluation report that lies next to every model version, drawn from its run record.

``report.json`` (everything, machine-readable), ``report.md`` (for a person;
embeds the PNGs), ``confusion.png``, ``calibration.png`` and, for strategies
that train, ``curves.png`` (and ``lr_finder.png`` after ``--lr auto``).
Figures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from tlserve.training.report.markdown import report_markdown
from tlserve.training.report.record import REPORT_FILENAME, RunRecord
from tlserve.training.report.thumbnails import data_check_files

__all__ = ["report_files"]


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


def report_files(record: RunRecord) -> dict[str, bytes]:
    """``report.json``, ``report.md`` and the PNGs they refer to."""
    files: dict[str, bytes] = {}
    evaluation = record.held_out_evaluation
    if evaluation:
        labels = record.card.labels if record.card else ()
        files["confusion.png"] = confusion_png(evaluation.confusion, labels)
    calibration = record.calibration
    if calibration and calibration.reliability_before:
        files["calibration.png"] = calibration_png(
            calibration.reliability_before, calibration.reliability_after
        )
    if record.chosen.history:
        files["curves.png"] = curves_png(record.chosen.history)
    if record.chosen.lr_curve:
        files["lr_finder.png"] = lr_png(record.chosen.lr_curve)
    files.update(data_check_files(record.data_check))  # label_issues.png, duplicates.png
    files[REPORT_FILENAME] = record.to_json()
    files["report.md"] = report_markdown(record, sorted(files)).encode()
    return files
