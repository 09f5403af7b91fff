"""Small parsers for batching and lifecycle settings, shared by config and core.

``version_policy`` (Triton's three policies, one server-wide string):

- ``latest:N`` — the N highest versions on disk (``latest`` alone is ``latest:1``);
- ``specific:1,3`` — exactly these versions, when present;
- ``all`` — every complete version.

``preferred_batch_sizes``: ``"4,8"``, positive integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MODEL_CONTROLS",
    "QUEUE_POLICIES",
    "VersionPolicy",
    "parse_batch_sizes",
    "parse_version_policy",
]

MODEL_CONTROLS = ("poll", "explicit")
#: The batcher's queue order (see tlserve.server.batching.queueing).
QUEUE_POLICIES = ("adaptive-lifo", "fifo")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: ``latest`` N, or ``specific`` ones."""

    kind: str  # "latest", "specific" or "all"
    latest: int = 1
    specific: tuple[int, ...] = ()

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve from those on disk, oldest first."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest :]

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.specific))
        return "all" if self.kind == "all" else f"latest:{self.latest}"


def _positive_ints(text: str, what: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{what} must be positive integers separated by commas, got {text!r}")
        values.append(int(part))
    return tuple(sorted(set(values)))


def parse_version_policy(text: str) -> VersionPolicy:
    """``latest:N``, ``specific:1,3`` or ``all``; ValueError naming the syntax otherwise."""
    kind, _, arg = text.strip().partition(":")
    if kind == "all" and not arg:
        return VersionPolicy("all")
    if kind == "latest":
        (n,) = _positive_ints(arg or "1", "latest:N") if "," not in arg else (0,)
        if n < 1:
            raise ValueError(f"latest:N takes one positive integer, got {text!r}")
        return VersionPolicy("latest", latest=n)
    if kind == "specific" and arg:
        return VersionPolicy("specific", specific=_positive_ints(arg, "specific versions"))
    raise ValueError(f"expected 'latest:N', 'specific:V1,V2' or 'all', got {text!r}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"4,8"`` -> ``(4, 8)``; empty -> ``()``."""
    return _positive_ints(text, "preferred batch sizes") if text.strip() else ()
