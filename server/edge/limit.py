"""The inference bound, adapted to how long the queues are in time.

A fixed count of calls means different things on different models: three
batches are 0.12 s of work at 800 requests/s and 1.4 s at 70, so on a slow
model the admitted calls wait most of their deadline. :class:`AdaptiveLimit`
follows the signal that matters instead, the queues' estimated wait (queued
and running rows at the measured compute time), as Netflix's
concurrency-limits AIMD limit and Envoy's adaptive-concurrency filter do
with latency: while the wait stays under half the queue-time target and
the limit is in use, it grows by about one call per limit calls; once the
wait passes the target it is cut by a tenth, at most once per
half target (the time the queue it cut takes to drain), so that one slow
spell is not cut once per call that ends in it. A fixed limit is one
whose floor and ceiling agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["AdaptiveLimit"]

_BACKOFF = 0.9  # a cut keeps this share of the limit (Netflix's AIMD default)


class AdaptiveLimit:
    """A bound on calls in the server that follows ``queue_time()``; see the module docstring."""

    def __init__(
        self,
        initial: int,
        *,
        floor: int,
        ceiling: int,
        target: float,
        queue_time: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.floor, self.ceiling = floor, max(floor, ceiling)
        self._value = float(min(self.ceiling, max(floor, initial)))
        self.target = target
        self.cooldown = max(0.01, target / 2)
        self._queue_time = queue_time
        self._clock = clock
        self._last_cut = -float("inf")

    @classmethod
    def fixed(cls, limit: int) -> AdaptiveLimit:
        return cls(limit, floor=limit, ceiling=limit, target=0.0, queue_time=lambda: 0.0)

    @property
    def value(self) -> int:
        return int(self._value)

    def update(self, inflight: int) -> None:
        """A call ended with ``inflight`` calls still in the server: adapt the limit."""
        if self.floor == self.ceiling:
            return
        wait = self._queue_time()
        if wait > self.target:
            now = self._clock()
            if now - self._last_cut >= self.cooldown:
                self._last_cut = now
                self._value = max(float(self.floor), self._value * _BACKOFF)
        elif wait < self.target / 2 and inflight + 1 >= self._value / 2:
            # Grow only while the limit is in use: an idle server learns nothing.
            self._value = min(float(self.ceiling), self._value + 1 / self._value)
