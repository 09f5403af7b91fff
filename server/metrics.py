"""Prometheus metrics, on a registry the caller injects (no module globals).

Durations are histograms in seconds; labels stay low-cardinality (model,
version, API, outcome), never request ids or client addresses.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServerMetrics"]

# From 0.5 ms to 10 s: a fast CPU batch to a slow overloaded queue.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric the server exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tlserve_requests",
            "Requests handled, by model, API and outcome (ok or a gRPC status name).",
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
        self.model_info = Gauge(
            "tlserve_model_loaded",
            "1 for each loaded model version, with the execution provider it runs on.",
            ["model", "version", "provider"],
            registry=r,
        )

    def serve_http(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Expose ``/metrics`` on ``host:port`` (0 picks a free port)."""
        return start_http_server(port, addr=host, registry=self.registry)
