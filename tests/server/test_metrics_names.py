"""Every metric the server exports follows Prometheus conventions.

Scraped from a real server after traffic of every kind (ok, invalid,
unknown models), so labelled series exist and their values can be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.support import TINY_SIZE, ServerThread, png_bytes
from tlserve.client import Client, ModelNotFound
from tlserve.contract.errors import DeadlineExceeded, InvalidInput
from tlserve.server.metrics import EXPIRED_SLACK_S, outcome_of

_NAME = re.compile(r"tlserve_[a-z][a-z0-9_]*[a-z0-9]")
_UNITS = ("_seconds", "_bytes", "_ratio", "_total", "_info")
# Labels that would grow without bound: per request, per caller.
_FORBIDDEN_LABELS = {"id", "request_id", "client", "peer", "address", "ip", "user", "token"}
_MAX_VALUES_PER_LABEL = 12


def _traffic(server: ServerThread) -> None:
    with Client(server.target) as client:
        images = np.zeros((2, TINY_SIZE, TINY_SIZE, 3), np.uint8)
        client.infer("tiny", {"images": images}, timeout=5)
        client.classify([png_bytes((9, 200, 9))], model="tiny", timeout=5)
        for bad in (b"not an image", b"\x89PNG\r\n\x1a\n broken"):
            with contextlib.suppress(InvalidInput):
                client.classify([bad], model="tiny", timeout=5)
        # Made-up model names must not become label values.
        for i in range(20):
            with contextlib.suppress(ModelNotFound):
                client.infer(f"nope-{i}", {"images": images}, timeout=5)


def test_every_metric_follows_prometheus_conventions(server: ServerThread) -> None:
    _traffic(server)
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 10
    problems: list[str] = []
    for family in families:
        name = family.name
        if name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        if not _NAME.fullmatch(name):
            problems.append(f"{name}: not tlserve_ snake_case")
        if family.type == "counter":
            # The parser strips _total from a counter's family name; samples keep it.
            bad = [s.name for s in family.samples if not s.name.endswith(("_total", "_created"))]
            if bad:
                problems.append(f"{name}: counter samples without _total: {bad}")
        elif name.endswith("_total"):
            problems.append(f"{name}: a {family.type} must not end in _total")
        is_time = any(word in name for word in ("duration", "latency", "time", "delay"))
        if is_time and not name.endswith("_seconds"):
            problems.append(f"{name}: durations are in _seconds")
        if family.type == "histogram" and not (name.endswith(_UNITS) or name.endswith("_size")):
            problems.append(f"{name}: histogram without a unit suffix")
        if name.endswith(("_milliseconds", "_ms", "_us", "_percent")):
            problems.append(f"{name}: use base units (seconds, bytes, ratio)")
        values: dict[str, set[str]] = {}
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label in ("le", "quantile"):
                    continue
                values.setdefault(label, set()).add(value)
        for label, seen in values.items():
            if label in _FORBIDDEN_LABELS:
                problems.append(f"{name}: high-cardinality label {label!r}")
            if len(seen) > _MAX_VALUES_PER_LABEL:
                problems.append(f"{name}: label {label!r} has {len(seen)} values: {sorted(seen)}")
    assert not problems, "\n".join(problems)


def test_the_metrics_users_look_for_are_there(server: ServerThread) -> None:
    _traffic(server)
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    for wanted in (
        "tlserve_request_duration_seconds",
        "tlserve_queue_duration_seconds",
        "tlserve_preprocess_duration_seconds",
        "tlserve_compute_duration_seconds",
        "tlserve_batch_size",
        "tlserve_requests",
        "tlserve_inferences",
        "tlserve_queue_depth",
        "tlserve_inflight_requests",
        "tlserve_model_loaded",
        "tlserve_images_decoded",
    ):
        assert wanted in names, wanted
    # One gauge says what is loaded: a series per version, with its provider.
    loaded = [s for s in text.splitlines() if s.startswith("tlserve_model_loaded{")]
    assert loaded == [
        'tlserve_model_loaded{model="tiny",provider="CPUExecutionProvider",version="1"} 1.0'
    ]
    assert "tlserve_models_loaded" not in text
    assert 'tlserve_inferences_total{model="tiny",outcome="OK",version="1"}' in text


def test_both_request_counters_count_outcomes_as_grpc_status_names(server: ServerThread) -> None:
    # One vocabulary, so the alerts' outcome="DEADLINE_EXCEEDED" matches either counter.
    _traffic(server)
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    status_names = {code.name for code in grpc.StatusCode}
    for family in text_string_to_metric_families(text):
        if family.name in ("tlserve_requests", "tlserve_inferences"):
            outcomes = {s.labels["outcome"] for s in family.samples if "outcome" in s.labels}
            assert "OK" in outcomes, family.name
            assert outcomes <= status_names, (family.name, outcomes - status_names)


def test_a_cancel_at_the_deadline_is_deadline_exceeded() -> None:
    cancel = asyncio.CancelledError()
    assert outcome_of(None) == "OK"
    assert outcome_of(cancel, EXPIRED_SLACK_S / 2) == "DEADLINE_EXCEEDED"
    assert outcome_of(cancel, 1.0) == "CANCELLED"
    assert outcome_of(cancel, None) == "CANCELLED"  # no deadline: the caller hung up
    assert outcome_of(DeadlineExceeded("late")) == "DEADLINE_EXCEEDED"
    assert outcome_of(RuntimeError("bug")) == "INTERNAL"
