"""Serving benchmark: tlserve over gRPC next to onnxruntime in-process, same run.

``make bench-serve``. For each model (lite0, and a fast model where serving
overhead dominates) it starts ``tlserve serve`` as a subprocess, drives a
closed-loop load at several concurrencies through the SDK (raw uint8 tensors
via ModelInfer, JPEG bytes via Classify), and prints throughput, p50/p90/p99
latency and the server's own queue/compute split (deltas of its /metrics
histograms), beside in-process onnxruntime on the same model and inputs
(batch-1 latency, best-batch throughput). Figures go to build/bench/serve.json
and a latency-vs-throughput plot to build/bench/serve.png.

Targets (2-core CPU, lite0): best-concurrency throughput >= 85% of
in-process best-batch throughput; at concurrency 1, p50 <= in-process batch-1
p50 + 1.5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script (`make bench-serve`), so this folder is on sys.path.
from bench_models import fast_model, lite0_model

from tlserve.client import AsyncClient, Client
from tlserve.contract.card import ModelCard
from tlserve.contract.images import prepare_image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
CONCURRENCY = (1, 2, 4, 8, 16)
BATCHES = (1, 2, 4, 8, 16, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _photo_jpeg(side: int = 640) -> bytes:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    image = image.resize((side, round(side * image.height / image.width)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def in_process(path: Path, rows: np.ndarray, seconds: float) -> dict[str, Any]:
    """onnxruntime in this process: batch-1 latency, throughput per batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: rows[:1]})
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, {name: rows[:1]})
        latencies.append(time.perf_counter() - started)
    throughput = {}
    for batch in BATCHES:
        feed = {name: np.repeat(rows[:1], batch, axis=0)}
        session.run(None, feed)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            session.run(None, feed)
            count += batch
        throughput[batch] = count / (time.perf_counter() - started)
    best = max(throughput, key=lambda b: throughput[b])
    return {
        "batch1": _percentiles(latencies),
        "throughput": throughput,
        "best_batch": best,
        "best_throughput": throughput[best],
    }


class Server:
    """``tlserve serve`` in a subprocess, on free ports."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.grpc_port, self.metrics_port = _free_port(), _free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.log = (OUT / f"server-{repo.name}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tlserve.cli.main", "serve", "--model-repository", str(repo),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
             "--drain-delay", "0", "--grace", "2"],
            env={**os.environ, "TLSERVE_DEVICE": "cpu", **env},
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        with Client(self.target) as client:
            client.wait_until_ready(timeout=120)

    def histograms(self) -> dict[str, float]:
        """Sum and count of the server's latency histograms and batch sizes."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        values: dict[str, float] = {}
        for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
            if line.startswith("tlserve_") and ("_sum" in line or "_count" in line):
                key, _, value = line.rpartition(" ")
                metric = key.split("{")[0]
                values[metric] = values.get(metric, 0.0) + float(value)
        return values

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


async def closed_loop(
    target: str, model: str, api: str, payload: Any, concurrency: int, seconds: float
) -> dict[str, Any]:
    """``concurrency`` callers, each sending its next request when the last returns."""
    latencies: list[float] = []
    async with AsyncClient(target, timeout=30) as client:

        async def call() -> None:
            if api == "infer":
                await client.infer(model, payload)
            else:
                await client.classify(payload, model=model, top_k=1)

        for _ in range(concurrency):  # warm the channel and the model
            await call()
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                await call()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"throughput": len(latencies) / elapsed, **_percentiles(latencies)}


def _split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def mean(name: str, scale: float = 1e3) -> float:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
        return scale * total / count if count else float("nan")

    return {
        "queue_ms": mean("tlserve_queue_duration_seconds"),
        "compute_ms": mean("tlserve_compute_duration_seconds"),
        "preprocess_ms": mean("tlserve_preprocess_duration_seconds"),
        "batch": mean("tlserve_batch_size", 1.0),
    }


def bench_model(name: str, path: Path, seconds: float) -> dict[str, Any]:
    card = ModelCard.from_props(_props(path))
    assert card is not None, f"{path} has no model card"
    jpeg = _photo_jpeg()
    row = prepare_image(jpeg, card.preprocessing)[None]
    print(f"\n== {name}: {path} ({card.preprocessing.height}px) ==", flush=True)
    local = in_process(path, row, seconds)
    server = Server(path.parent.parent.parent, {})
    results: dict[str, Any] = {"in_process": local, "served": {}}
    try:
        for api, payload in (("infer", {"images": row}), ("classify", jpeg)):
            for concurrency in CONCURRENCY:
                before = server.histograms()
                figures = asyncio.run(
                    closed_loop(server.target, name, api, payload, concurrency, seconds)
                )
                figures.update(_split(before, server.histograms()))
                results["served"][f"{api}@{concurrency}"] = figures
    finally:
        server.stop()
    _print(name, results)
    return results


def _props(path: Path) -> dict[str, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def _print(name: str, results: dict[str, Any]) -> None:
    local = results["in_process"]
    print(f"in-process onnxruntime: batch-1 p50 {local['batch1']['p50']:.2f} ms; best "
          f"{local['best_throughput']:.1f} img/s at batch {local['best_batch']}")  # fmt: skip
    header = f"{'api@conc':>12} {'img/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'queue':>7} "
    print(header + f"{'compute':>8} {'prep':>6} {'batch':>6}   (ms)")
    for key, f in results["served"].items():
        print(f"{key:>12} {f['throughput']:8.1f} {f['p50']:7.2f} {f['p90']:7.2f} {f['p99']:7.2f} "
              f"{f['queue_ms']:7.2f} {f['compute_ms']:8.2f} {f['preprocess_ms']:6.2f} "
              f"{f['batch']:6.1f}")  # fmt: skip
    if name != "lite0":  # the targets are set for lite0; here overhead is the point
        return
    infer = [v for k, v in results["served"].items() if k.startswith("infer@")]
    best = max(v["throughput"] for v in infer)
    ratio = best / local["best_throughput"]
    c1 = results["served"]["infer@1"]["p50"] - local["batch1"]["p50"]
    results["targets"] = {"throughput_ratio": ratio, "c1_p50_overhead_ms": c1}
    print(f"targets: best served / in-process throughput = {ratio:.0%} (>= 85%: "
          f"{'met' if ratio >= 0.85 else 'MISSED'}); c=1 p50 overhead = {c1:+.2f} ms "
          f"(<= 1.5 ms: {'met' if c1 <= 1.5 else 'MISSED'})", flush=True)  # fmt: skip


def plot(all_results: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4.5))
    for ax, (name, results) in zip(np.atleast_1d(axes), all_results.items(), strict=True):
        for api, marker in (("infer", "o"), ("classify", "s")):
            points = [v for k, v in results["served"].items() if k.startswith(api + "@")]
            for q, style in (("p50", "-"), ("p99", ":")):
                ax.plot([p["throughput"] for p in points], [p[q] for p in points],
                        style, marker=marker, label=f"served {api} {q}")  # fmt: skip
        local = results["in_process"]
        ax.axvline(local["best_throughput"], color="grey", ls="--", label="in-process best")
        ax.axhline(local["batch1"]["p50"], color="grey", ls="-.", label="in-process b1 p50")
        ax.set(title=name, xlabel="throughput (images/s)", ylabel="latency (ms)", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT / "serve.png"
    fig.savefig(path, dpi=110)
    return path


def decode_speed(sides: tuple[int, ...] = (1000, 2000, 4000), repeat: int = 5) -> dict[str, Any]:
    """Classify's JPEG fast path (DCT-domain downscaling) vs the exact path, per image."""
    from tlserve.contract.card import Preprocessing
    from tlserve.server.decode import ImageDecoder

    spec = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    decoder = ImageDecoder()
    figures: dict[str, Any] = {}
    print(f"\n== Classify decode: fast JPEG path vs exact (best of {repeat}, ms) ==")
    for side in sides:
        data = _photo_jpeg(side)
        timings = {}
        for label, fn in (
            ("exact", lambda data=data: prepare_image(data, spec)),
            ("fast", lambda data=data: decoder.prepare(data, spec)),
        ):
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1000)
            timings[label] = min(times)
        figures[str(side)] = timings
        print(f"{side:>5} px: exact {timings['exact']:7.1f}  fast {timings['fast']:7.1f}  "
              f"({timings['exact'] / timings['fast']:.1f}x)")  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per load level")
    parser.add_argument("--models", default="lite0,fast", help="comma-separated: lite0, fast")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    builders = {"lite0": lite0_model, "fast": fast_model}
    all_results = {}
    for name in args.models.split(","):
        path = builders[name](OUT / "models")
        all_results[path.parent.parent.name] = bench_model(
            path.parent.parent.name, path, args.seconds
        )
    plot_path = plot(all_results)
    figures: dict[str, Any] = {**all_results, "decode_ms": decode_speed()}
    (OUT / "serve.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nfigures: {OUT / 'serve.json'}; plot: {plot_path}")


if __name__ == "__main__":
    main()
