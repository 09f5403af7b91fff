"""Load-time tuning: the settings that matter, measured on this host with the real model.

How many threads one onnxruntime run uses (``intra_op_threads``), how many
batches run at once (``instances``) and how large a batch may grow
(``max_batch_size``) decide a CPU model's throughput by up to 3x, and the
best choice depends on the model and the host. So while a model version
warms up, :func:`tune_model` runs it at each combination for a slice of a
bounded time (``TLSERVE_TUNE_SECONDS``), keeps the combination with the best
throughput among those whose batch runs within ``TLSERVE_TUNE_LATENCY_CAP``,
logs the table and returns the choice (shown in ``ModelConfig`` and the
``tlserve_model_setting`` metric).

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
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tlserve.contract.rules import GPU_PROVIDERS
from tlserve.server.config import ServerConfig
from tlserve.server.metrics import ServerMetrics
from tlserve.server.runtime import OnnxModel, load_model

__all__ = [
    "AUTO_MIN_BATCH1_SECONDS",
    "SETTINGS",
    "Trial",
    "Tuning",
    "candidate_batches",
    "pick",
    "publish_tuning",
    "tune_model",
    "warm_up",
    "withdraw_tuning",
]

log = logging.getLogger(__name__)

AUTO_MIN_BATCH1_SECONDS = 0.001
SETTINGS = ("intra_op_threads", "instances", "max_batch_size")
# Throughputs this close to the best count as equal; the cheaper setting wins.
_TIE = 0.03
_MIN_RUNS = 3

Loader = Callable[..., OnnxModel]


@dataclass(frozen=True)
class Trial:
    """One measured combination: images/s with ``instances`` runs at once, median batch time."""

    intra_op_threads: int
    instances: int
    batch: int
    images_per_second: float
    batch_seconds: float


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

    def settings(self) -> dict[str, int]:
        """The three settings by name."""
        return {name: int(getattr(self, name)) for name in SETTINGS}

    def table(self) -> str:
        """The measurements as a small text table, best first (for the log)."""
        lines = [f"{'threads':>7} {'inst':>4} {'batch':>5} {'img/s':>8} {'batch ms':>8}"]
        for t in sorted(self.trials, key=lambda t: -t.images_per_second):
            lines.append(
                f"{t.intra_op_threads:>7} {t.instances:>4} {t.batch:>5} "
                f"{t.images_per_second:>8.1f} {1e3 * t.batch_seconds:>8.2f}"
            )
        return "\n".join(lines)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def candidate_batches(max_batch_size: int) -> list[int]:
    """Batch sizes worth trying: 1, powers of 4 and the largest allowed."""
    sizes = {1, max_batch_size}
    size = 4
    while size < max_batch_size:
        sizes.add(size)
        size *= 4
    return sorted(sizes)


def pick(trials: list[Trial], latency_cap: float) -> Trial:
    """Best throughput among the trials within the cap (the fastest batch if none is);
    near-ties go to fewer threads x instances, then the smaller batch."""
    within = [t for t in trials if t.batch_seconds <= latency_cap]
    if not within:
        return min(trials, key=lambda t: t.batch_seconds)
    best = max(t.images_per_second for t in within)
    close = [t for t in within if t.images_per_second >= (1 - _TIE) * best]
    return min(close, key=lambda t: (t.intra_op_threads * t.instances, t.batch))


def _measure(model: OnnxModel, threads: int, instances: int, batch: int, seconds: float) -> Trial:
    """``instances`` threads running batches of ``batch`` for about ``seconds``."""
    feeds = model.dummy_inputs(batch)
    model.run(feeds)  # this shape's first run allocates; not timed
    times: list[list[float]] = [[] for _ in range(instances)]
    stop_at = time.perf_counter() + seconds

    def loop(out: list[float]) -> None:
        while len(out) < _MIN_RUNS or time.perf_counter() < stop_at:
            started = time.perf_counter()
            model.run(feeds)
            out.append(time.perf_counter() - started)

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(out,)) for out in times]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    runs = sum(len(out) for out in times)
    every = [t for out in times for t in out]
    return Trial(threads, instances, batch, runs * batch / elapsed, statistics.median(every))


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
) -> tuple[OnnxModel, Tuning]:
    """Load ``path``, warm it, and (per ``config.tune``) measure and pick its settings.

    Blocking: call it in a thread. Returns the model loaded with the chosen
    ``intra_op_threads`` and the :class:`Tuning` to build its batcher with.
    """
    started = time.perf_counter()
    fixed = {k for k in SETTINGS if k in config.explicit_keys}
    sources = {k: "explicit" if k in fixed else "default" for k in SETTINGS}
    model = loader(path, config, metrics)
    feeds = model.dummy_inputs()
    model.run(feeds)  # the first run allocates and picks kernels
    batch1 = float("inf")
    for _ in range(_MIN_RUNS):  # the fastest of a few: a busy host inflates single runs
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
        return model, _finish(untuned, skip, started)
    deadline = started + config.tune_seconds
    threads = [config.intra_op_threads] if "intra_op_threads" in fixed or on_gpu else _threads()
    instances = [config.instances] if "instances" in fixed else [1, 2]
    batches = (
        [config.max_batch_size]
        if "max_batch_size" in fixed or not model.batchable
        else candidate_batches(config.max_batch_size)
    )
    slice_s = max(0.02, config.tune_seconds / (2 * len(threads) * len(instances) * len(batches)))
    trials: list[Trial] = []
    sessions: dict[int, OnnxModel] = {}
    for count in threads:
        if time.perf_counter() >= deadline and trials:
            break
        sessions[count] = (
            model if len(threads) == 1 else loader(path, config, metrics, intra_op_threads=count)
        )
        for n in instances:
            for batch in batches:
                if time.perf_counter() + slice_s > deadline and trials:
                    break
                trials.append(_measure(sessions[count], count, n, batch, slice_s))
    chosen = pick(trials, config.tune_latency_cap)
    model = sessions[chosen.intra_op_threads]
    tuned = {
        "intra_op_threads": len(threads) > 1,
        "instances": len(instances) > 1,
        "max_batch_size": len(batches) > 1,
    }
    sources.update({name: "tuned" for name, was in tuned.items() if was})
    tuning = Tuning(
        intra_op_threads=chosen.intra_op_threads,
        instances=chosen.instances,
        max_batch_size=chosen.batch if tuned["max_batch_size"] else config.max_batch_size,
        sources=sources,
        trials=tuple(trials),
        batch1_seconds=batch1,
    )
    if on_gpu and model.batchable:
        warm_up(model, list(range(1, tuning.max_batch_size + 1)))
    done = len(trials) == len(threads) * len(instances) * len(batches)
    reason = f"best throughput with batches within {1e3 * config.tune_latency_cap:.0f} ms" + (
        "" if done else f"; time bound reached after {len(trials)} trials"
    )
    return model, _finish(tuning, reason, started)


def _threads() -> list[int]:
    cores = _cores()
    return sorted({cores, max(1, cores // 2), 1}, reverse=True)


def _why_not(config: ServerConfig, fixed: set[str], batch1: float, on_gpu: bool) -> str:
    """Why this model is not tuned (empty when it is)."""
    if config.tune == "off":
        return "tuning off (TLSERVE_TUNE=off)"
    if fixed == set(SETTINGS):
        return "every tuned setting was given explicitly"
    if config.tune == "auto" and batch1 < AUTO_MIN_BATCH1_SECONDS and not on_gpu:
        return (
            f"batch-1 run takes {1e3 * batch1:.2f} ms (< {1e3 * AUTO_MIN_BATCH1_SECONDS:g} ms): "
            "the request path bounds this model; TLSERVE_TUNE=on tunes it anyway"
        )
    return ""


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
