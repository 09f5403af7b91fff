"""Load-time tuning: the settings that matter, measured on this host with the real model.

How many threads one onnxruntime run uses (``intra_op_threads``), how many
batches run at once (``instances``) and how large a batch may grow
(``max_batch_size``) decide a CPU model's throughput, and the best choice
depends on the model and the host. So while a model version warms up,
:func:`tune_model` measures it within a bounded time
(``TLSERVE_TUNE_SECONDS``): each layout (threads x instances filling the
cores) gets the largest batch that runs within ``TLSERVE_TUNE_LATENCY_CAP``,
and the layouts are then compared in interleaved, repeated trials. Another
layout replaces the default (on a CPU, one thread per instance and an
instance per core for a compute-bound model, all cores and one instance for
a request-bound one: :func:`tuning_search.default_layout`) only when it wins
by more than the spread of the repeats (:func:`tuning_search.decide`), so
two starts on one host choose alike. A serving session narrower than the host
leaves an all-cores session for batches that run alone. The choice and why
are logged and shown in ``ModelConfig`` and the ``tlserve_model_setting``
metric.

A setting given by flag or environment is never changed, only measured at
its value. ``TLSERVE_TUNE``: ``auto`` tunes models whose batch-1 run takes
at least :data:`AUTO_MIN_BATCH1_SECONDS` (below that the request path, not
the model, bounds throughput, and tuning would only slow the start), ``on``
always, ``off`` never. On a GPU the model is then warmed at every batch size
the batcher may run, so no request pays for an engine build or an
algorithm search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tlserve.contract.rules import GPU_PROVIDERS
from tlserve.server.config import ServerConfig
from tlserve.server.metrics import ServerMetrics
from tlserve.server.models.runtime import OnnxModel, load_model
from tlserve.server.models.tuning_search import (
    MIN_RUNS,
    ROUNDS,
    Layout,
    Trial,
    candidate_batches,
    cores,
    decide,
    default_layout,
    layouts,
    lone_threads,
    measure,
    search,
)

__all__ = [
    "AUTO_MIN_BATCH1_SECONDS",
    "SETTINGS",
    "Trial",
    "Tuned",
    "Tuning",
    "candidate_batches",
    "decide",
    "publish_tuning",
    "tune_model",
    "warm_up",
    "withdraw_tuning",
]

log = logging.getLogger(__name__)

AUTO_MIN_BATCH1_SECONDS = 0.001
SETTINGS = ("intra_op_threads", "instances", "max_batch_size")

Loader = Callable[..., OnnxModel]


@dataclass(frozen=True)
class Tuning:
    """The settings a model version serves with, and where each came from."""

    intra_op_threads: int
    instances: int
    max_batch_size: int
    sources: dict[str, str] = field(default_factory=dict)  # "tuned", "explicit", "default"
    trials: tuple[Trial, ...] = ()
    seconds: float = 0.0
    reason: str = ""
    batch1_seconds: float = 0.0
    # Threads of the session a batch runs on when no other batch is running or
    # waiting (0: it runs on the tuned count like every other).
    lone_threads: int = 0

    def settings(self) -> dict[str, int]:
        """The three settings by name."""
        return {name: int(getattr(self, name)) for name in SETTINGS}

    def table(self) -> str:
        """The measurements as a small text table, in the order they ran (for the log)."""
        lines = [f"{'threads':>7} {'inst':>4} {'batch':>5} {'img/s':>8} {'batch ms':>8}"]
        for t in self.trials:
            lines.append(
                f"{t.intra_op_threads:>7} {t.instances:>4} {t.batch:>5} "
                f"{t.images_per_second:>8.1f} {1e3 * t.batch_seconds:>8.2f}"
            )
        return "\n".join(lines)


class Tuned(NamedTuple):
    """What :func:`tune_model` returns: the session to serve with, its settings, and the
    session for lone batches (None: the same one)."""

    model: OnnxModel
    tuning: Tuning
    lone: OnnxModel | None = None


def warm_up(model: OnnxModel, batch_sizes: list[int]) -> None:
    """Run the model once at each batch size (smallest and largest first, so TensorRT's
    shape range covers the rest from the start)."""
    if not batch_sizes:
        return
    order = [min(batch_sizes), max(batch_sizes)]
    order += [b for b in sorted(set(batch_sizes)) if b not in order]
    for batch in order:
        model.run(model.dummy_inputs(batch))


def tune_model(
    path: Path,
    config: ServerConfig,
    metrics: ServerMetrics | None = None,
    *,
    loader: Loader = load_model,
) -> Tuned:
    """Load ``path``, warm it, and (per ``config.tune``) measure and pick its settings.

    Blocking: call it in a thread. Returns the model loaded with the chosen
    ``intra_op_threads``, the :class:`Tuning` to build its batcher with, and
    the all-cores session lone batches run on when the chosen one is narrower.
    """
    started = time.perf_counter()
    fixed = {k for k in SETTINGS if k in config.explicit_keys}
    sources = {k: "explicit" if k in fixed else "default" for k in SETTINGS}
    model = loader(path, config, metrics)
    feeds = model.dummy_inputs()
    model.run(feeds)  # the first run allocates and picks kernels
    batch1 = float("inf")
    for _ in range(MIN_RUNS):  # the fastest of a few: a busy host inflates single runs
        probe = time.perf_counter()
        model.run(feeds)
        batch1 = min(batch1, time.perf_counter() - probe)
    on_gpu = model.provider in GPU_PROVIDERS
    untuned = Tuning(
        config.intra_op_threads, config.instances, config.max_batch_size, sources,
        batch1_seconds=batch1,
    )  # fmt: skip
    skip = _why_not(config, fixed, batch1, on_gpu)
    if skip:
        if on_gpu and model.batchable:
            warm_up(model, list(range(1, config.max_batch_size + 1)))
        if _request_bound(config, batch1, on_gpu) and "intra_op_threads" not in fixed:
            # onnxruntime's pool threads spin-wait after each run, on the cores the
            # request path needs. Measured on the bench's toy model (0.04 ms, 2
            # cores, 16 calls in flight): one thread served 1522 and 2244 req/s
            # against 1019 and 1088 with the default two, at 0.50-0.74 ms of
            # server CPU per call against 1.56-1.63.
            model = loader(path, config, None, intra_op_threads=1)  # its fallback is counted
            model.run(feeds)
            sources["intra_op_threads"] = "tuned"
            untuned = dataclasses.replace(untuned, intra_op_threads=1, sources=sources)
            skip += "; one intra-op thread (a thread pool would spin on the request path's cores)"
        return Tuned(model, _finish(untuned, skip, started))
    host = cores()
    # On a GPU the thread count matters little, and another session would build
    # its engines again: the loaded one is measured as it is.
    given = (config.intra_op_threads or (0 if on_gpu else host), config.instances)
    default = default_layout(*given, host, fixed, on_gpu, row_core_seconds=batch1 * host)
    candidates = layouts(default, host, fixed, on_gpu)
    batches = (
        [config.max_batch_size]
        if "max_batch_size" in fixed or not model.batchable
        else candidate_batches(config.max_batch_size)
    )
    sessions = {config.intra_op_threads: model}

    def session(threads: int) -> OnnxModel:
        if threads not in sessions:  # one per thread count; a fallback was counted above
            sessions[threads] = loader(path, config, None, intra_op_threads=threads)
        return sessions[threads]

    def trial(layout: Layout, batch: int, seconds: float, warm: bool) -> Trial:
        threads, instances = layout
        served = model if len(candidates) == 1 else session(threads)
        return measure(served, threads, instances, batch, seconds, warm=warm)

    found = search(
        trial, candidates, batches, config.tune_latency_cap, started + config.tune_seconds
    )
    chosen, why = decide(
        {k: [t.images_per_second for t in ts] for k, ts in found.repeats.items()}, default
    )
    threads, instances = chosen
    model = model if len(candidates) == 1 else session(threads)
    lone = 0 if on_gpu else lone_threads(threads, host, "intra_op_threads" in fixed)
    searched = {
        "intra_op_threads": len({t for t, _ in candidates}) > 1,
        "instances": len({n for _, n in candidates}) > 1,
        "max_batch_size": len(batches) > 1,
    }
    sources.update({name: "tuned" for name, was in searched.items() if was})
    max_batch = found.batches[chosen] if searched["max_batch_size"] else config.max_batch_size
    tuning = Tuning(
        intra_op_threads=threads,
        instances=instances,
        max_batch_size=max_batch,
        sources=sources,
        trials=tuple(found.trials()),
        batch1_seconds=batch1,
        lone_threads=lone,
    )
    if on_gpu and model.batchable:
        warm_up(model, list(range(1, max_batch + 1)))
    cap, cap_ms = config.tune_latency_cap, 1e3 * config.tune_latency_cap
    parts = [why or f"{threads} x {instances}: the only layout the given settings allow"]
    past = any(  # only batches[0] is kept when it runs past the cap
        t.layout == chosen and t.batch == max_batch and t.batch_seconds > cap for t in found.probes
    )
    if searched["max_batch_size"]:
        within = f"even that ran past {cap_ms:.0f} ms" if past else (
            f"the largest whose batch ran within {cap_ms:.0f} ms"
        )  # fmt: skip
        parts.append(f"max batch {max_batch}: {within}")
    if lone:
        parts.append(f"a batch running alone uses {lone} threads (all cores)")
    if found.cut:
        rounds = min((len(ts) for ts in found.repeats.values()), default=0)
        parts.append(f"time bound reached ({rounds} of {ROUNDS} rounds)")
    return Tuned(model, _finish(tuning, "; ".join(parts), started), session(lone) if lone else None)


def _why_not(config: ServerConfig, fixed: set[str], batch1: float, on_gpu: bool) -> str:
    """Why this model is not tuned (empty when it is)."""
    if config.tune == "off":
        return "tuning off (TLSERVE_TUNE=off)"
    if fixed == set(SETTINGS):
        return "every tuned setting was given explicitly"
    if _request_bound(config, batch1, on_gpu):
        return (
            f"batch-1 run takes {1e3 * batch1:.2f} ms (< {1e3 * AUTO_MIN_BATCH1_SECONDS:g} ms): "
            "the request path bounds this model; TLSERVE_TUNE=on tunes it anyway"
        )
    return ""


def _request_bound(config: ServerConfig, batch1: float, on_gpu: bool) -> bool:
    """Too fast to tune: the request path, not the model, bounds its throughput."""
    return config.tune == "auto" and batch1 < AUTO_MIN_BATCH1_SECONDS and not on_gpu


def _finish(tuning: Tuning, reason: str, started: float) -> Tuning:
    return dataclasses.replace(tuning, seconds=time.perf_counter() - started, reason=reason)


def publish_tuning(metrics: ServerMetrics, name: str, version: str, tuning: Tuning) -> None:
    """Log the table and the choice; expose the choice as ``tlserve_model_setting``."""
    if tuning.trials:
        log.info(
            "model %r version %s tuned in %.1f s (%s):\n%s",
            name, version, tuning.seconds, tuning.reason, tuning.table(),
        )  # fmt: skip
    log.info(
        "model %r version %s serves with %s (%s)",
        name,
        version,
        ", ".join(
            f"{k}={v} [{tuning.sources.get(k, 'default')}]" for k, v in tuning.settings().items()
        ),
        tuning.reason,
    )
    for setting, value in tuning.settings().items():
        source = tuning.sources.get(setting, "default")
        metrics.model_setting.labels(name, version, setting, source).set(value)


def withdraw_tuning(metrics: ServerMetrics, name: str, version: str, tuning: Tuning) -> None:
    """Remove an unloaded version's ``tlserve_model_setting`` series."""
    for setting in SETTINGS:
        with contextlib.suppress(KeyError):
            metrics.model_setting.remove(
                name, version, setting, tuning.sources.get(setting, "default")
            )
