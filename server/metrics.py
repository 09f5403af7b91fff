"""Prometheus metrics, on a registry the caller injects (no module globals).

Durations are histograms in seconds; labels stay low-cardinality (model,
version, API, outcome), never request ids or client addresses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tlserve.contract.errors import TlserveError

__all__ = ["EXPIRED_SLACK_S", "ServerMetrics", "outcome_of", "time_left"]

#: A call cancelled with this little time left counts as expired: the
#: caller's deadline started when it sent the call, ours when it arrived, so
#: its side gives up (and cancels) a network delay before ours would.
EXPIRED_SLACK_S = 0.05


def outcome_of(exc: BaseException | None, seconds_left: float | None = None) -> str:
    """The ``outcome`` label of both request counters: ``OK`` or a gRPC status name.

    ``exc`` is what the request ended with (None: it succeeded);
    ``seconds_left`` is how long its deadline still had to run (None: none).
    """
    if exc is None:
        return "OK"
    if isinstance(exc, TlserveError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        # gRPC cancels the handler's task when the deadline passes; that is the
        # caller's deadline, and alerts watch for DEADLINE_EXCEEDED.
        expired = seconds_left is not None and seconds_left < EXPIRED_SLACK_S
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    return "INTERNAL"


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (event-loop time), None without one."""
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


# From 0.5 ms to 10 s: a fast CPU batch to a slow overloaded queue.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# ood_score / threshold: raw scores differ in scale from model to model, this
# does not (held-out training-like images sit below 1, 1 in 100 above it).
_OOD_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """Every metric the server exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tlserve_requests",
            "Requests handled, by model, API and outcome (OK or a gRPC status name).",
            ["model", "api", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tlserve_request_duration_seconds",
            "Time from receiving a request to answering it.",
            ["model", "api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "tlserve_queue_duration_seconds",
            "Time a request waited in the batcher's queue before its batch ran.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "tlserve_compute_duration_seconds",
            "Time onnxruntime took to run one batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "tlserve_preprocess_duration_seconds",
            "Time to decode and resize the images of one Classify request.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tlserve_batch_size",
            "Rows per batch run by the model.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tlserve_queue_depth", "Rows waiting in the batcher's queue.", ["model"], registry=r
        )
        self.queue_time = Gauge(
            "tlserve_queue_time_estimate_seconds",
            "Estimated wait of a request arriving now: the queued and running rows at the "
            "measured compute time per row.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "tlserve_model_loaded",
            "1 for each loaded model version, with the execution provider it runs on.",
            ["model", "version", "provider"],
            registry=r,
        )
        self.model_setting = Gauge(
            "tlserve_model_setting",
            "Each loaded version's intra_op_threads, instances and max_batch_size, and "
            "whether load-time tuning chose it (source tuned, explicit or default).",
            ["model", "version", "setting", "source"],
            registry=r,
        )
        self.model_variant = Gauge(
            "tlserve_model_variant",
            "1 for the variant each loaded version serves (float32, int8, int8-rr, fp16), "
            "and how it was chosen (measured on this host, explicit, or the only one).",
            ["model", "version", "variant", "source"],
            registry=r,
        )
        # Where requests go once admitted, and what the edges refuse or fall back on.
        self.inferences = Counter(
            "tlserve_inferences",
            "Requests that reached a model, by version and outcome (OK or a gRPC status name).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.shed = Counter(
            "tlserve_shed_requests",
            "Requests the batcher refused or dropped without running them, by reason: "
            "queue_full, queue_time (the work ahead passed the queue-time limit), late "
            "(could not meet its deadline), expired (deadline passed while queued), "
            "too_large (can never fit the queue).",
            ["model", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tlserve_inflight_requests",
            "Requests admitted to a model and not yet answered (queued or running).",
            ["model"],
            registry=r,
        )
        # Model lifecycle: loads, swaps and unloads by outcome.
        self.model_loads = Counter(
            "tlserve_model_loads",
            "Model version loads (outcome ok or failed) and unloads (outcome unloaded).",
            ["model", "outcome"],
            registry=r,
        )
        self.provider_fallbacks = Counter(
            "tlserve_provider_fallbacks",
            "Model loads that asked for a GPU provider and fell back to another one.",
            ["model", "requested", "provider"],
            registry=r,
        )
        self.auth_failures = Counter(
            "tlserve_auth_failures",
            "Calls refused for a missing or invalid bearer token.",
            ["reason"],
            registry=r,
        )
        self.images_decoded = Counter(
            "tlserve_images_decoded",
            "Images decoded for Classify, by decoder path (jpeg_fast or exact).",
            ["path"],
            registry=r,
        )
        # What the model is sent, against what it was trained on: a camera or
        # product change shows here before anyone notices wrong labels.
        self.ood_score = Histogram(
            "tlserve_ood_score_ratio",
            "Each classified image's ood_score over its model's threshold (above 1: flagged).",
            ["model"],
            buckets=_OOD_BUCKETS,
            registry=r,
        )
        self.ood_flagged = Counter(
            "tlserve_ood_flagged_images",
            "Classified images whose ood_score is above the model card's threshold.",
            ["model", "version"],
            registry=r,
        )

    @contextmanager
    def inference(self, model: str, version: str, deadline: float | None = None) -> Iterator[None]:
        """Count one request in a model: in-flight while inside, then its outcome.

        The outcome is :func:`outcome_of`'s, as ``tlserve_requests_total``
        counts it: a cancellation at the caller's ``deadline`` (event-loop
        time) is ``DEADLINE_EXCEEDED``, not ``CANCELLED``.
        """
        gauge = self.in_flight.labels(model)
        gauge.inc()
        outcome = outcome_of(None)
        try:
            yield
        except BaseException as exc:
            outcome = outcome_of(exc, time_left(deadline))
            raise
        finally:
            gauge.dec()
            self.inferences.labels(model, version, outcome).inc()

    def serve_http(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Expose ``/metrics`` on ``host:port`` (0 picks a free port)."""
        return start_http_server(port, addr=host, registry=self.registry)
