"""What ``make bench-overload`` prints: each overload phase, then each model's medians
beside the targets (``overload.py`` runs the phases)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

#: The late caller's deadline: under the wait a fresh call meets on lite0 in
#: overload (its light caller's answers: p99 370-530 ms), so those calls cannot
#: be met and should be refused at once; on the fast net they are mostly served.
LATE_DEADLINE = 0.2
#: A phase's late-caller figures when it did not run.
NO_LATE_CALLER: dict[str, Any] = {
    "outcomes": {},
    "deadline_ms": {"n": 0},
    "refused_late_ms": {"n": 0},
}


def print_phase(label: str, nice: int, args: argparse.Namespace, phase: dict[str, Any]) -> None:
    """One overload phase: the flood, where its refused calls spent their time, the callers."""
    overload, refusals, lately = phase["load"], phase["light"], phase["late"]
    ratio = phase["goodput_ratio"]
    refused = refusals["refused_ms"]
    print(f"  overload, generator at {label} priority (nice {nice}), {args.inflight} in "
          f"flight, 2 s deadlines: goodput {overload['ok_per_s']:.0f} req/s = {ratio:.0%} "
          f"of capacity; outcomes {overload['outcomes']}; server CPU "
          f"{overload['server_cpu_s'] / args.seconds:.0%} of a core", flush=True)  # fmt: skip
    print(f"    the server counted {overload['server_counts']}", flush=True)
    for key, what in (("deadline_ms", "DEADLINE_EXCEEDED, from sending"),
                      ("refused_late_ms", "  of which refused by the server, from sending"),
                      ("refused_late_before_ms", "    before the server took them up"),
                      ("refused_late_after_ms", "    from then on")):  # fmt: skip
        late = overload.get(key, {"n": 0})
        p50, p99 = late.get("p50", float("nan")), late.get("p99", float("nan"))
        print(f"    {what}: p50 {p50:.0f} ms, p99 {p99:.0f} ms over {late['n']}",
              flush=True)  # fmt: skip
    print(
        f"    refused before the parse: {overload.get('refused_unparsed', 0)}; no answer "
        f"before the deadline (gRPC's own): {overload.get('unanswered', 0)}",
        flush=True,
    )
    p50, p99 = refused.get("p50", float("nan")), refused.get("p99", float("nan"))
    print(f"    light caller: RESOURCE_EXHAUSTED in p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"over {refused['n']} refusals; all its {refusals['outcomes']} in p50 "
          f"{refusals['any_ms'].get('p50', 0):.1f} / p99 "
          f"{refusals['any_ms'].get('p99', 0):.1f} ms; "
          f"server RSS {phase['rss_mb']}", flush=True)  # fmt: skip
    heard, lag = lately["refused_late_ms"], overload["loop_lag_ms"]
    print(f"    late caller ({args.late_deadline * 1e3:.0f} ms deadlines): {lately['outcomes']}; "
          f"refused for its deadline, heard in p50 {heard.get('p50', float('nan')):.1f} ms, "
          f"p99 {heard.get('p99', float('nan')):.1f} ms from sending over {heard['n']}; "
          f"the flood's own timer lag p50 {lag.get('p50', 0):.0f} ms, "
          f"p99 {lag.get('p99', 0):.0f} ms", flush=True)  # fmt: skip


def summary(model: str, rounds: list[dict[str, Any]], late_deadline: float) -> None:
    """Medians over rounds beside the targets (one round's goodput drifts +-20% here)."""
    print(f"{model}: capacity median "
          f"{statistics.median(r['capacity']['ok_per_s'] for r in rounds):.0f} req/s")  # fmt: skip
    for label, target in (("equal", 0.5), ("lower", 0.8)):
        ratios = [r[f"overload_{label}"]["goodput_ratio"] for r in rounds]
        median = statistics.median(ratios)
        print(f"goodput, generator at {label} priority: median {median:.0%} of capacity "
              f"[{min(ratios):.0%}-{max(ratios):.0%}] over {len(ratios)} rounds "
              f"(>= {target:.0%}: {'met' if median >= target else 'MISSED'})")  # fmt: skip
    p99s = [
        r[f"overload_{label}"]["light"]["refused_ms"]["p99"]
        for r in rounds for label in ("equal", "lower")
        if r[f"overload_{label}"]["light"]["refused_ms"]["n"]
    ]  # fmt: skip
    if p99s:
        print(f"light caller's RESOURCE_EXHAUSTED p99: worst {max(p99s):.1f} ms over "
              f"{len(p99s)} phases that refused it (< 50 ms: "
              f"{'met' if max(p99s) < 50 else 'MISSED'})")  # fmt: skip
    else:
        print("light caller's RESOURCE_EXHAUSTED p99: n/a (never refused)")
    for key, what in (("deadline_ms", "every DEADLINE_EXCEEDED, from sending"),
                      ("refused_late_ms", "refused for its deadline, from sending"),
                      ("refused_late_before_ms", "  of which before the server took it up"),
                      ("refused_late_after_ms", "refused for its deadline, from when the "
                                                "server took it up")):  # fmt: skip
        late = [
            r[f"overload_{label}"]["load"].get(key, {}).get("p99", float("nan"))
            for r in rounds for label in ("equal", "lower")
        ]  # fmt: skip
        print(f"{what}: p99 per phase {', '.join(f'{ms:.0f}' for ms in late)} ms")
    lags = [r[f"overload_{label}"]["load"]["loop_lag_ms"].get("p99", float("nan"))
            for r in rounds for label in ("equal", "lower")]  # fmt: skip
    print(f"  the flood's own 10 ms timer fired late by p99 {', '.join(f'{ms:.0f}' for ms in lags)}"
          " ms per phase: answers it read that late")  # fmt: skip
    lates = [r[f"overload_{label}"]["late"] for r in rounds for label in ("equal", "lower")]
    heard = [late["refused_late_ms"] for late in lates]
    measured = [h["p99"] for h in heard if h["n"]]
    met = "met" if measured and max(measured) < 100 else "MISSED" if measured else "n/a"
    phases = ", ".join(f"{h.get('p99', float('nan')):.0f} (n={h['n']})" for h in heard)
    expired = ", ".join(
        f"{late['deadline_ms']['n'] - late['refused_late_ms']['n']} of "
        f"{sum(late['outcomes'].values())}" for late in lates
    )  # fmt: skip
    print(f"late caller ({late_deadline * 1e3:.0f} ms deadlines, its own connection), refused "
          f"for its deadline: p99 from sending per phase {phases} ms (< 100 ms: {met}); "
          f"admitted and then past its deadline: {expired} calls")  # fmt: skip
