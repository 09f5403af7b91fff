"""A gate around a served model's batch function: "the model is busy" on demand.

Installed on a running server's batcher, it holds every batch until the test
releases it, so queueing, deadlines and unloads are set up as states rather
than raced for with a slow model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

Arrays = dict[str, np.ndarray]


class Gate:
    """Wraps a batch function; each batch waits for a permit once :meth:`close`d."""

    def __init__(self, run: Callable[[Arrays], Arrays]) -> None:
        self._run = run
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.closed = True
        self.entered = 0  # batches that reached the model
        self.rows = 0  # rows that reached the model

    def __call__(self, feeds: Arrays) -> Arrays:
        with self._lock:
            self.entered += 1
            self.rows += len(next(iter(feeds.values())))
        if self.closed:
            assert self._permits.acquire(timeout=30), "the test never opened the gate"
        return self._run(feeds)

    def open(self) -> None:
        self.closed = False
        self._permits.release(1000)

    def wait_entered(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.entered < count:
            assert time.monotonic() < deadline, f"{self.entered} of {count} batches arrived"
            time.sleep(0.002)


def install_gate(running: object, model: str = "tiny") -> Gate:
    """Put a closed gate in front of ``model``'s newest version on a running server."""
    batcher = running.core.registry.get(model).batcher  # type: ignore[attr-defined]
    gate = Gate(batcher._run_batch)
    batcher._run_batch = gate
    return gate
