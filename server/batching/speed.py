"""How fast one model version computes: one estimate, written only by its batcher.

:class:`~tlserve.server.batching.batcher.DynamicBatcher` owns the
:class:`Speed` of its version and is its one writer: it says when a batch
starts and ends and, for a batch that ran, how long the model took
(:meth:`Speed.measured`). The queue only reads it, to plan with the time the
work ahead will take: the retry hint, whether a deadline can still be met,
and how long a queue may stand before it counts as overloaded.
"""

from __future__ import annotations

__all__ = ["Speed"]

_EWMA = 0.2  # weight of the newest batch in the per-row compute estimate


class Speed:
    """Recent compute seconds per row (an EWMA over batches) and the rows running now."""

    def __init__(self, row_seconds: float, instances: int = 1) -> None:
        self._row_seconds = row_seconds
        self._instances = instances
        self._running_rows = 0

    @property
    def row_seconds(self) -> float:
        return self._row_seconds

    @property
    def running_rows(self) -> int:
        return self._running_rows

    def seconds(self, rows: int) -> float:
        """The compute time of ``rows`` rows, spread over the instances."""
        return rows * self._row_seconds / self._instances

    def started(self, rows: int) -> None:
        """A batch of ``rows`` rows began to run."""
        self._running_rows += rows

    def ended(self, rows: int) -> None:
        """A batch of ``rows`` rows stopped running, whether it ran or failed."""
        self._running_rows -= rows

    def measured(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows ran in ``seconds`` of model compute."""
        self._row_seconds += _EWMA * (seconds / rows - self._row_seconds)
