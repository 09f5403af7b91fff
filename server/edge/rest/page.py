"""What the model page shows: the loaded versions with their cards, and each
version's training report (``report.md`` and its PNGs) as HTML.

The report is rendered from the small Markdown subset the training report
writes (headings, paragraphs, tables, lists, images, ``**bold**`` and
``code``), every character of its text escaped: no HTML in a report reaches
the browser. Its figures are served by name only, from the version's own
folder: a name that is not a plain ``*.png`` file name there is not found.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from tlserve.contract.errors import ModelNotFound
from tlserve.contract.predictions import ood_threshold
from tlserve.server.models.lifecycle import ModelRegistry
from tlserve.server.models.repository import LoadedModel

__all__ = ["REPORT_FILE", "STATIC", "figure", "models_summary", "report_html"]

REPORT_FILE = "report.md"
_FIGURE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.png")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_ITEM = re.compile(r"^\s*[-*]\s+")
_BLOCK = re.compile(r"#|\s*\||\s*[-*]\s")  # a line that starts a heading, table or list

#: The page's files, served from the package (no build step, nothing from a CDN).
STATIC: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
STATIC_DIR = Path(__file__).resolve().parent / "static"


def version_dir(registry: ModelRegistry, loaded: LoadedModel) -> Path:
    return Path(registry.config.model_repository) / loaded.name / loaded.version


def models_summary(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Each serving version and what its card says, for the page."""
    rows = []
    for name in registry.names():
        for loaded in registry.versions(name):
            card = loaded.model.card
            metrics = dict(card.metrics) if card else {}
            rows.append(
                {
                    "name": loaded.name,
                    "version": loaded.version,
                    "labels": list(card.labels) if card else [],
                    "backbone": card.backbone if card else "",
                    "strategy": card.strategy if card else "",
                    "accuracy": metrics.get("test_accuracy"),
                    "ood_threshold": ood_threshold(metrics),
                    "variant": loaded.variant.variant if loaded.variant else "float32",
                    "provider": loaded.model.provider,
                    "classifies": card is not None,
                    "report": (version_dir(registry, loaded) / REPORT_FILE).is_file(),
                }
            )
    return rows


def figure(registry: ModelRegistry, name: str, version: str, file: str) -> bytes:
    """One PNG of a serving version's folder, by plain file name; ModelNotFound otherwise."""
    loaded = registry.get(name, version)
    folder = version_dir(registry, loaded).resolve()
    path = (folder / file).resolve()
    if not _FIGURE.fullmatch(file) or path.parent != folder or not path.is_file():
        raise ModelNotFound(f"model {name!r} version {version!r} has no figure {file[:80]!r}")
    return path.read_bytes()


def report_html(registry: ModelRegistry, name: str, version: str) -> str:
    """The version's ``report.md`` as a standalone HTML page; ModelNotFound if it has none."""
    loaded = registry.get(name, version)
    path = version_dir(registry, loaded) / REPORT_FILE
    if not path.is_file():
        raise ModelNotFound(f"model {name!r} version {version!r} has no training report")
    body = markdown_html(path.read_text(encoding="utf-8", errors="replace"))
    title = html.escape(f"{loaded.name} {loaded.version}: training report")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<link rel="stylesheet" href="/static/page.css"></head>'
        f'<body class="report"><p><a href="/">&larr; models</a></p>{body}</body></html>'
    )


def _inline(text: str) -> str:
    """Escaped text with images (plain PNG names only), bold and code."""

    def image(match: re.Match[str]) -> str:
        alt, target = match.group(1), match.group(2)
        if not _FIGURE.fullmatch(target):
            return html.escape(match.group(0))
        return f'<img alt="{html.escape(alt)}" src="files/{target}">'

    parts, last = [], 0
    for match in _IMAGE.finditer(text):
        parts.append(_styled(text[last : match.start()]))
        parts.append(image(match))
        last = match.end()
    parts.append(_styled(text[last:]))
    return "".join(parts)


def _styled(text: str) -> str:
    escaped = html.escape(text)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    return _BOLD.sub(r"<strong>\1</strong>", escaped)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_html(text: str) -> str:
    """The training report's Markdown subset as HTML; see the module docstring."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif heading := re.match(r"(#{1,6})\s+(.*)", line):
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(lines[i])
                i += 1
            body = [r for r in rows if not re.fullmatch(r"[\s|:-]+", r)]
            table = ["<table>"]
            for n, row in enumerate(body):
                tag = "th" if n == 0 else "td"
                table.append(
                    "<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in _cells(row)) + "</tr>"
                )
            out.append("".join(table) + "</table>")
        elif _ITEM.match(line):
            items = []
            while i < len(lines) and _ITEM.match(lines[i]):
                items.append(f"<li>{_inline(_ITEM.sub('', lines[i]))}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            paragraph, i = [line.strip()], i + 1  # at least this line: no loop stalls
            while i < len(lines) and lines[i].strip() and not _BLOCK.match(lines[i]):
                paragraph.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(out)
