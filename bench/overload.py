"""Overload benchmark: goodput under 10x overload, and how fast a refusal comes.

``make bench-overload``. Starts ``tlserve serve`` as its own process on
127.0.0.1 with one model at a time, each on 224 px images (each request is
one 150 KB uint8 tensor, so receiving and parsing it is a real cost): a
small conv net (``fast``, overhead-bound, ~800 requests/s) and then the
example model (``lite0``, about five times the compute here), and drives it from
separate load-generator processes over grpc.aio:

- capacity: 16 calls in flight (30 s deadlines): OK answers per second;
- overload: 2,000 calls in flight with 2 s deadlines, the generator at the
  server's CPU priority and then at a lower one (``os.nice`` in the
  generator): goodput = OK answers per second, beside capacity;
- meanwhile a light caller (its own process, one call at a time) measures
  how long a RESOURCE_EXHAUSTED takes to come back (p50/p99), and a late
  caller (the same, with deadlines too short to be met on lite0:
  ``--late-deadline``) how long a refusal for its deadline takes;
- how soon a DEADLINE_EXCEEDED reaches the flood's callers (p50/p99), and,
  for the calls the server refused as unable to answer in time, how that
  time splits: before the server took the call up (its deadline less the
  ``deadline-left-ms`` the refusal carries: time spent on the caller's side
  of the connection, past its stream limit) and from then on;
- the server's RSS (VmRSS now, VmHWM peak) after each phase.

Each of the 2,000 in-flight slots behaves as the SDK does: a refused call
(RESOURCE_EXHAUSTED, UNAVAILABLE) is retried after the server's
``retry-after-ms`` hint, or a jittered
exponential backoff when there is none, never past its 2 s deadline; then
the slot starts a fresh call. ``--no-backoff`` makes them retry at once (a
hostile caller). Everything is bounded: each phase stops by itself.

Targets (2 cores): goodput >= 80% of capacity with the generator at lower
priority and >= 50% at equal priority; the light caller's RESOURCE_EXHAUSTED
p99 < 50 ms; the late caller hears a refusal for its deadline within 100 ms
(p99) of sending. One round's goodput drifts by +-20% on 2 cores (the first
seconds of 2,000 new calls are a burst of their own), so ``--rounds`` rounds
of ``--seconds`` phases run on one server and the targets are judged on the
medians, each round's goodput a ratio to that round's own capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

# Run as a script (`make bench-overload`), so this folder is on sys.path.
from bench_models import fast_model, lite0_model
from overload_report import LATE_DEADLINE, NO_LATE_CALLER, print_phase, summary

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
SIZE = 224


def _start_generator(target: str, inflight: int, deadline: float, seconds: float,
                     nice: int = 0, *, light: bool = False, no_backoff: bool = False,
                     model: str = "fast") -> subprocess.Popen[str]:  # fmt: skip
    command = [sys.executable, str(Path(__file__).with_name("loadgen.py")), "--target", target,
               "--model", model,
               "--inflight", str(inflight), "--deadline", str(deadline),
               "--seconds", str(seconds), "--nice", str(nice)]  # fmt: skip
    command += ["--light"] if light else []
    command += ["--no-backoff"] if no_backoff else []
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # starved of CPU past any use: no figures
        process.kill()
        process.communicate()
        return {"ok_per_s": float("nan"), "outcomes": {"generator timed out": 1},
                "refused_ms": {"n": 0}, "any_ms": {"n": 0}, "ok_ms": {"n": 0},
                "deadline_ms": {"n": 0}, "loop_lag_ms": {"n": 0},
                "refused_late_ms": {"n": 0}}  # fmt: skip
    assert process.returncode == 0, f"generator failed ({process.returncode})"
    return dict(json.loads(out))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


class Server:
    """``tlserve serve`` in its own process on free loopback ports, until ready."""

    def __init__(self, repo: Path, flags: list[str]) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        self.target = f"127.0.0.1:{port}"
        self.log = (OUT / "server-overload.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tlserve.cli.main", "serve", "--model-repository", str(repo),
             "--grpc-port", str(port), "--metrics-port", "0", "--http-port", "0",
             "--drain-delay", "0", "--grace", "2", "--device", "cpu", *flags],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(self.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                assert self.process.poll() is None, "the server exited; see its log"
                assert time.monotonic() < deadline, "the server never became ready"
                try:
                    if check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)

        found = re.search(
            r"metrics on (http://\S+/metrics)", (OUT / "server-overload.log").read_text()
        )
        assert found, "the server did not log its metrics address"
        self.metrics_url = found.group(1)

    def counts(self) -> dict[str, float]:
        """The server's own request outcomes and shed reasons, from /metrics."""
        counts: dict[str, float] = {}
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        for metric, label in (("tlserve_requests_total", "outcome"),
                              ("tlserve_shed_requests_total", "reason")):  # fmt: skip
            for found in re.finditer(
                rf'^{metric}{{[^}}]*{label}="(\w+)"[^}}]*}} (\S+)$', text, re.M
            ):
                key = f"{label}:{found.group(1)}"
                counts[key] = counts.get(key, 0.0) + float(found.group(2))
        return counts

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


MODELS = {  # both take 224 px uint8 images as "images"
    "fast": lambda: fast_model(OUT / "overload", size=SIZE),
    "lite0": lambda: lite0_model(OUT / "overload"),
}


def run(args: argparse.Namespace, model: str) -> dict[str, Any]:
    repo = MODELS[model]().parent.parent.parent
    server = Server(repo, args.server_flags.split())
    pid = server.process.pid
    figures: dict[str, Any] = {"rss_mb": {"start": _rss_mb(pid)}, "rounds": []}
    args.model = model
    try:
        _result(_start_generator(server.target, 16, 30.0, 2.0, model=model), 60)  # warm up
        for index in range(args.rounds):
            print(f"{model}: round {index + 1}/{args.rounds}", flush=True)
            figures["rounds"].append(_round(server, args))
    finally:
        figures["server_exit"] = server.stop()
    return figures


def _round(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Capacity, then overload at equal and at lower generator priority, on one server."""
    pid, figures = server.process.pid, {}
    cpu = _cpu_seconds(pid)
    capacity = _result(
        _start_generator(server.target, 16, 30.0, args.seconds, model=args.model), 120
    )
    capacity["server_cpu_s"] = _cpu_seconds(pid) - cpu
    figures["capacity"] = capacity
    print(f"  capacity (16 in flight): {capacity['ok_per_s']:.0f} req/s, p50 "
          f"{capacity['ok_ms'].get('p50', 0):.1f} ms; server CPU "
          f"{capacity['server_cpu_s'] / args.seconds:.0%} of a core", flush=True)  # fmt: skip
    for label, nice in (("equal", 0), ("lower", 10)):
        time.sleep(3)  # let the last phase's calls drain
        cpu, counted = _cpu_seconds(pid), server.counts()
        load = _start_generator(server.target, args.inflight, 2.0, args.seconds, nice,
                                no_backoff=args.no_backoff, model=args.model)  # fmt: skip
        time.sleep(min(2.0, args.seconds / 4))  # the light caller measures under overload
        light = _start_generator(server.target, 1, 2.0, args.seconds - 3.0, light=True,
                                 model=args.model)  # fmt: skip
        late = args.late_deadline and _start_generator(
            server.target, 1, args.late_deadline, args.seconds - 3.0, light=True, model=args.model
        )
        overload, refusals = _result(load, args.seconds + 60), _result(light, args.seconds + 60)
        lately = _result(late, args.seconds + 60) if late else NO_LATE_CALLER
        overload["server_cpu_s"] = _cpu_seconds(pid) - cpu
        overload["server_counts"] = {
            k: v - counted.get(k, 0.0) for k, v in server.counts().items()
            if v - counted.get(k, 0.0)
        }  # fmt: skip
        ratio = overload["ok_per_s"] / capacity["ok_per_s"]
        figures[f"overload_{label}"] = {"load": overload, "light": refusals, "late": lately,
                                        "rss_mb": _rss_mb(pid), "goodput_ratio": ratio}  # fmt: skip
        print_phase(label, nice, args, figures[f"overload_{label}"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3, help="capacity + overload rounds")
    parser.add_argument("--inflight", type=int, default=2000)
    parser.add_argument("--no-backoff", action="store_true", help="refused calls retry at once")
    parser.add_argument("--late-deadline", type=float, default=LATE_DEADLINE,
                        help="the late caller's deadline, seconds (0: none)")  # fmt: skip
    parser.add_argument("--server-flags", default="", help="extra `tlserve serve` flags")
    parser.add_argument("--models", default="fast,lite0", help="run one after the other")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    figures = {model: run(args, model) for model in args.models.split(",")}
    for model, measured in figures.items():
        summary(model, measured["rounds"], args.late_deadline)
    (OUT / "overload.json").write_text(json.dumps(figures, indent=2))
    print(f"figures: {OUT / 'overload.json'}")


if __name__ == "__main__":
    main()
