"""The measuring half of load-time tuning: one trial, and the search over trials.

:mod:`tlserve.server.tuning` decides what to search and applies the result.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tlserve.server.runtime import OnnxModel

__all__ = [
    "Trial",
    "candidate_batches",
    "cores",
    "lone_threads",
    "measure",
    "pick",
    "search",
    "thread_counts",
]

# Throughputs this close to the best count as equal; the cheaper setting wins.
_TIE = 0.03
# A lone batch gets a wider session only when that measured at least this much
# faster at batch 1: single trials here drift by 10% and more.
_LONE_GAIN = 0.2
MIN_RUNS = 2


@dataclass(frozen=True)
class Trial:
    """One measured combination: images/s with ``instances`` runs at once, median batch time."""

    intra_op_threads: int
    instances: int
    batch: int
    images_per_second: float
    batch_seconds: float


def cores() -> int:
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


def lone_threads(trials: list[Trial], chosen: Trial) -> int:
    """Threads for a batch that runs while no other does (0: the chosen count).

    Throughput picks the fewest threads per instance (one each on 2 cores); a
    lone request then runs on one core while the others idle, at up to twice
    the latency. The thread count with the fastest batch-1 run of one instance
    serves those, if it beat the chosen count's by ``_LONE_GAIN``.
    """
    if chosen.instances < 2:
        return 0
    alone = {
        t.intra_op_threads: t.batch_seconds for t in trials if t.instances == 1 and t.batch == 1
    }
    if chosen.intra_op_threads not in alone:
        return 0
    fastest = min(alone, key=alone.__getitem__)
    if fastest == chosen.intra_op_threads:
        return 0
    return fastest if alone[fastest] <= (1 - _LONE_GAIN) * alone[chosen.intra_op_threads] else 0


def measure(model: OnnxModel, threads: int, instances: int, batch: int, seconds: float) -> Trial:
    """``instances`` threads running batches of ``batch`` for about ``seconds``."""
    feeds = model.dummy_inputs(batch)
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


def search(
    measure: Callable[[int, int, int], Trial],
    threads: list[int],
    instances: list[int],
    batches: list[int],
    cap: float,
    deadline: float,
    slice_s: float,
) -> tuple[list[Trial], bool]:
    """Three rounds, so that a tight bound still covers every dimension: threads x
    instances at the smallest batch; batch sizes upwards at the best of those, until one
    runs past the cap; threads x instances again at the best batch size and at the
    largest one within the cap.

    Returns the trials and whether the time bound cut the search short.
    """
    trials: dict[tuple[int, int, int], Trial] = {}
    cut = False

    def run(count: int, n: int, batch: int) -> Trial | None:
        nonlocal cut
        key = (count, n, batch)
        if key not in trials:
            if trials and time.perf_counter() + slice_s > deadline:
                cut = True
                return None
            trials[key] = measure(count, n, batch)
        return trials[key]

    grid = [(count, n) for count in threads for n in instances]
    for count, n in grid:
        run(count, n, batches[0])
    lead = pick(list(trials.values()), cap)
    for batch in batches[1:]:
        trial = run(lead.intra_op_threads, lead.instances, batch)
        if trial is None or trial.batch_seconds > cap:
            break  # larger batches only take longer
    best = pick(list(trials.values()), cap).batch
    # Also the largest batch within the cap: threads scale with the batch, so
    # a setting that loses at batch 1 can win there (int8 lite0 on 2 cores: 2
    # threads x 1 instance reached 362 images/s at batch 32 in-process where
    # the round at batch 1 kept 1 thread x 2 instances at 287).
    largest = max((t.batch for t in trials.values() if t.batch_seconds <= cap), default=best)
    for batch in sorted({best, largest}):
        for count, n in grid:
            run(count, n, batch)
    return list(trials.values()), cut


def thread_counts() -> list[int]:
    """Intra-op thread counts worth trying: all cores, half of them, one."""
    count = cores()
    return sorted({count, max(1, count // 2), 1}, reverse=True)
