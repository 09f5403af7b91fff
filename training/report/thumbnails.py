"""Thumbnail grids of the data check's top suspects, as PNG, and the report section showing them.

``label_issues.png``: the images the probe most confidently thinks are
mislabelled, each captioned with its given label, the probe's label and its
probability. ``duplicates.png``: near-duplicate pairs side by side, with
their similarity and splits (leaks first).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from PIL import Image, UnidentifiedImageError

from tlserve.training.check.datacheck import DataCheck
from tlserve.training.check.suspects import DUPLICATE_SIMILARITY, DuplicatePair, LabelIssue

__all__ = ["MAX_SHOWN", "data_check_files", "data_check_markdown", "thumbnail_grid"]

MAX_SHOWN = 16  # suspects per grid: the top of the list, the rest are in report.json
_COLUMNS = 4
_PIXELS = 96


def _thumbnail(path: str) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        image.thumbnail((_PIXELS, _PIXELS))
        return np.asarray(image)
    except (OSError, UnidentifiedImageError):
        return np.full((_PIXELS, _PIXELS, 3), 200, np.uint8)  # grey: gone or unreadable


def _show(axes: Axes, path: str, caption: str) -> None:
    axes.imshow(_thumbnail(path))
    axes.set_title(caption, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])


def thumbnail_grid(cells: Sequence[tuple[str, str]], columns: int = _COLUMNS) -> bytes:
    """A PNG grid of ``(path, caption)`` cells, ``columns`` wide."""
    rows = max(1, -(-len(cells) // columns))
    figure, grid = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.2 * rows), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, (path, caption) in zip(grid.flat, cells, strict=False):
        axes.axis("on")
        _show(axes, path, caption)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _issue_cells(issues: Sequence[LabelIssue]) -> list[tuple[str, str]]:
    return [
        (
            issue.path,
            f"given {issue.given} ({issue.given_probability:.2f})\n"
            f"probe: {issue.predicted} ({issue.predicted_probability:.2f})",
        )
        for issue in issues[:MAX_SHOWN]
    ]


def _pair_cells(pairs: Sequence[DuplicatePair]) -> list[tuple[str, str]]:
    cells = []
    for pair in pairs[: MAX_SHOWN // 2]:
        tag = "LEAK " if pair.leak else ""
        cells.append((pair.a, f"{tag}{pair.split_a}\nsimilarity {pair.similarity:.3f}"))
        cells.append((pair.b, f"{tag}{pair.split_b}\n{pair.b.rsplit('/', 1)[-1]}"))
    return cells


def data_check_files(check: DataCheck | None) -> dict[str, bytes]:
    """The grids of ``check``'s suspects (none when it found nothing to show)."""
    files = {}
    if check and check.label_issues:
        files["label_issues.png"] = thumbnail_grid(_issue_cells(check.label_issues))
    if check and check.duplicates:
        files["duplicates.png"] = thumbnail_grid(_pair_cells(check.duplicates))
    return files


def data_check_markdown(check: DataCheck | None) -> list[str]:
    """The report's "Data check" section: findings, then the grids."""
    if check is None:
        return []
    lines = ["", "## Data check", "", check.summary() + ".", ""]
    lines += [f"- {finding}" for finding in check.findings()] or ["- nothing to report"]
    lines += ["", f"Label issues by {check.method}."]
    if check.label_issues:
        shown = min(MAX_SHOWN, len(check.label_issues))
        lines += [
            "",
            f"The {shown} most suspect labels (all {len(check.label_issues)} are listed "
            "by path in report.json, `data_check.label_issues`):",
            "",
            "![likely label issues](label_issues.png)",
        ]
    if check.duplicates:
        lines += [
            "",
            f"Near-duplicate pairs (cosine similarity of embeddings >= "
            f"{DUPLICATE_SIMILARITY}), leaks first:",
            "",
            "![near-duplicates](duplicates.png)",
        ]
    return lines
