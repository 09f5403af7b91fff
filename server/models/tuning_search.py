"""The measuring half of load-time tuning: trials, the search, and the decision rule.

:mod:`tlserve.server.models.tuning` decides what to search and applies the result.

A layout is ``(intra_op_threads, instances)``. The search has two phases:
each layout's batch size grows until its median batch time passes the
latency cap (the largest batch within it is that layout's batch); then the
layouts run at those batches in interleaved rounds (ABAB..., the order
rotating each round, so drift on a shared host hits every layout alike).
:func:`decide` keeps the default layout unless another one's median
throughput beats it by more than the spread of both layouts' repeats.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tlserve.server.models.runtime import OnnxModel

__all__ = [
    "FLOOR",
    "MIN_REPEATS",
    "MIN_RUNS",
    "ROUNDS",
    "Layout",
    "Search",
    "Trial",
    "candidate_batches",
    "cores",
    "decide",
    "layouts",
    "lone_threads",
    "measure",
    "search",
    "thread_counts",
]

Layout = tuple[int, int]  # (intra_op_threads, instances)

MIN_RUNS = 2  # timed runs per instance in every trial, however short its slice
ROUNDS = 5  # interleaved repeats of each layout
# Fewer repeats than this (the time bound cut the rounds): the default stays,
# since two numbers give no spread to judge a gain against.
MIN_REPEATS = 3
# The smallest margin a layout must win by: below it, keeping the default
# costs less than the 5% that two starts of one model may differ by.
FLOOR = 0.05
# Phase one (batch sizes) may use this share of the time left, so the
# interleaved rounds that decide the layout keep the larger part.
PROBE_SHARE = 0.4


@dataclass(frozen=True)
class Trial:
    """One measured combination: images/s with ``instances`` runs at once, median batch time."""

    intra_op_threads: int
    instances: int
    batch: int
    images_per_second: float
    batch_seconds: float

    @property
    def layout(self) -> Layout:
        return (self.intra_op_threads, self.instances)


@dataclass
class Search:
    """What :func:`search` measured: each layout's batch, its repeats, the probes."""

    batches: dict[Layout, int] = field(default_factory=dict)
    repeats: dict[Layout, list[Trial]] = field(default_factory=dict)
    probes: list[Trial] = field(default_factory=list)
    cut: bool = False  # the time bound stopped it early

    def trials(self) -> list[Trial]:
        return [*self.probes, *(t for ts in self.repeats.values() for t in ts)]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_counts(count: int) -> list[int]:
    """Intra-op thread counts worth trying on ``count`` cores: all, half, one."""
    return sorted({count, max(1, count // 2), 1}, reverse=True)


def candidate_batches(max_batch_size: int) -> list[int]:
    """Batch sizes worth trying: powers of two and the largest allowed. Neighbours
    differ little in throughput, so noise at the cap's edge costs little."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


# The request path's CPU per call in the server (gRPC, the event loop, tlserve's
# Python), measured on 2 cores: 0.5 ms at 96 px, 0.83-0.95 ms at 224 px.
REQUEST_PATH_SECONDS = 0.001
# One thread per instance by default only where a row's compute on one core is
# at least this many request paths: the compute is then 80% of a call's CPU.
NARROW_MIN_PATHS = 4.0


def default_layout(
    threads: int,
    instances: int,
    host_cores: int,
    fixed: set[str],
    on_gpu: bool,
    row_core_seconds: float,
) -> Layout:
    """The layout kept unless another measures clearly faster: in-process trials
    cannot see the event loop's share of the cores, so layouts that tie there
    serve differently. ``row_core_seconds``: one row's compute on one core.

    - Compute-bound (a row is :data:`NARROW_MIN_PATHS` request paths or more):
      one thread per instance, an instance per core, since a pool of intra-op
      threads stalls whenever the busy loop deschedules one. lite0 at 224 px
      (8 ms a row), 2,000 calls in flight on 2 cores: goodput 56% and 69% of
      capacity with 1 x 2 against 36% and 54% with 2 x 1. A batch that runs
      alone still gets all cores (:func:`lone_threads`).
    - Request-bound: all cores x 1, which leaves the loop room between
      batches: lite0 at 96 px (2 ms a row) served 816 and 916 images/s with
      2 x 1 against 719 and 727 with 1 x 2.
    - On a GPU, or with a setting given: as given (0 threads: onnxruntime's).
    """
    if on_gpu or fixed & {"intra_op_threads", "instances"}:
        return threads, instances
    if row_core_seconds >= NARROW_MIN_PATHS * REQUEST_PATH_SECONDS:
        return 1, host_cores
    return host_cores, 1


def layouts(default: Layout, host_cores: int, fixed: set[str], on_gpu: bool) -> list[Layout]:
    """The default first, then the layouts that fill the cores without oversubscribing
    them (threads x instances = cores); a fixed setting stays at its value."""
    threads, instances = default
    if "intra_op_threads" in fixed or on_gpu:
        counts = [threads]
    elif "instances" in fixed:
        counts = [max(1, host_cores // instances)]
    else:
        counts = thread_counts(host_cores)
    if "instances" in fixed:
        found = [(t, instances) for t in counts]
    elif on_gpu:  # no cores to share: one run at a time, or two overlapping
        found = [(t, n) for t in counts for n in (1, 2)]
    else:
        found = [(t, max(1, host_cores // t)) for t in counts]
    return list(dict.fromkeys([default, *found]))


def lone_threads(serving_threads: int, host_cores: int, threads_fixed: bool) -> int:
    """Threads for a batch that runs while no other does (0: the serving count).

    Throughput may want one thread per instance; a lone request would then
    compute on one core while the others idle. All cores serve it instead,
    with no measurement to earn it: single trials drift more than the gain,
    and at worst the lone batch runs as fast as on the narrow session.
    """
    return host_cores if not threads_fixed and serving_threads < host_cores else 0


def measure(
    model: OnnxModel,
    threads: int,
    instances: int,
    batch: int,
    seconds: float,
    *,
    warm: bool = True,
) -> Trial:
    """``instances`` threads running batches of ``batch`` for about ``seconds``."""
    feeds = model.dummy_inputs(batch)
    if warm:
        model.run(feeds)  # this shape's first run allocates; not timed
    times: list[list[float]] = [[] for _ in range(instances)]
    stop_at = time.perf_counter() + seconds

    def loop(out: list[float]) -> None:
        while len(out) < MIN_RUNS or time.perf_counter() < stop_at:
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


Measure = Callable[[Layout, int, float, bool], Trial]  # layout, batch, seconds, warm


def search(
    measure: Measure,
    candidates: list[Layout],
    batches: list[int],
    cap: float,
    deadline: float,
    rounds: int = ROUNDS,
) -> Search:
    """Each layout's largest batch within ``cap``, then ``rounds`` interleaved repeats
    of every layout at its batch, within ``deadline`` (a ``time.perf_counter`` value)."""
    found = Search()
    probe_until = time.perf_counter() + PROBE_SHARE * (deadline - time.perf_counter())
    for layout in candidates:
        found.batches[layout] = batches[0]
        for batch in batches:
            if found.probes and time.perf_counter() > probe_until:
                found.cut = True
                break
            trial = measure(layout, batch, 0.0, True)  # MIN_RUNS runs: a median, quickly
            found.probes.append(trial)
            if trial.batch_seconds > cap:
                break  # larger batches only take longer
            found.batches[layout] = batch
    # A trial runs past its slice by up to a batch: leave room for that.
    longest = max(t.batch_seconds for t in found.probes if t.batch == found.batches[t.layout])
    left = max(0.0, deadline - time.perf_counter())
    slice_s = max(0.0, left / (rounds * len(candidates)) - longest)
    for index in range(rounds):
        order = candidates[index % len(candidates) :] + candidates[: index % len(candidates)]
        for layout in order:
            done = found.repeats.setdefault(layout, [])
            # Half a slice of slack: a trial overruns its slice by a part of a batch.
            if done and time.perf_counter() + slice_s / 2 > deadline:
                found.cut = True
                return found
            done.append(measure(layout, found.batches[layout], slice_s, False))
    return found


def decide(
    repeats: dict[Layout, list[float]],
    default: Layout,
    floor: float = FLOOR,
    min_repeats: int = MIN_REPEATS,
) -> tuple[Layout, str]:
    """The layout to serve with, and why: the default unless another layout's median
    throughput beats the default's by more than ``max(floor, spread of either)``,
    where a spread is (max - min) / median of a layout's repeats."""
    if len(repeats) < 2:
        return default, ""
    base = statistics.median(repeats[default])
    rivals = [layout for layout in repeats if layout != default]
    best = max(rivals, key=lambda layout: statistics.median(repeats[layout]))
    gain = statistics.median(repeats[best]) / base - 1
    margin = max(floor, _spread(repeats[default]), _spread(repeats[best]))
    count = min(len(values) for values in repeats.values())
    measured = f"{_short(best)} measured {abs(gain):.0%} {'faster' if gain >= 0 else 'slower'}"
    if count < min_repeats:
        return default, (
            f"{_name(default)} kept: {measured}, but only {count} repeats fit the time bound"
        )
    if gain <= margin:
        return default, (
            f"{_name(default)} kept: {measured}, inside the {margin:.0%} margin "
            f"(spread of the repeats, at least {floor:.0%})"
        )
    return best, (
        f"{_name(best)}: {gain:.0%} faster than {_short(default)} (the default), "
        f"beyond the {margin:.0%} spread of the repeats"
    )


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def _name(layout: Layout) -> str:
    threads, instances = layout
    return (
        f"{threads} thread{'s' if threads != 1 else ''} x "
        f"{instances} instance{'s' if instances != 1 else ''}"
    )


def _short(layout: Layout) -> str:
    return f"{layout[0]}x{layout[1]}"
