"""Per model-version statistics, as Triton's statistics extension reports them.

Counts and durations are cumulative since the version was loaded; durations
are in nanoseconds. ``inference_count`` counts rows (a batch of 8 counts 8),
``execution_count`` counts model runs (a batch of 8 counts 1). Request-level
figures (success, fail, queue, compute_*) count requests: a request that
shared a batch is charged the whole batch's compute time, as Triton does.

Everything is updated on the event loop's thread, so no lock is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Duration", "ModelStatistics"]


@dataclass
class Duration:
    """A count and a total duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)


@dataclass
class BatchDurations:
    """Executions at one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    """Everything ``ModelStatistics`` reports for one model version."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def record_request(self, ns: int, *, ok: bool) -> None:
        """One request answered (``ok``) or failed, end to end."""
        (self.success if ok else self.fail).add(ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_queue(self, ns: int) -> None:
        """One request left the queue for a batch."""
        self.queue.add(ns)

    def record_batch(
        self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One model execution of ``rows`` rows serving ``requests`` requests."""
        self.inference_count += rows
        self.execution_count += 1
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        at_size = self.batches.setdefault(rows, BatchDurations())
        at_size.compute_input.add(input_ns)
        at_size.compute_infer.add(infer_ns)
        at_size.compute_output.add(output_ns)
