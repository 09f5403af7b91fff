"""Serving benchmark: float32 and int8, in-process and served over gRPC, in alternating passes.

``make bench-serve``. For each model (lite0, the example model; and
``lite0-96``, the same at 96 px, about a millisecond of compute, where the
per-request path dominates; ``--models fast`` adds a toy model of microseconds) it
makes the int8 variant (``bench_models.int8_model``), starts one ``tlserve
serve`` with both, and then runs ``--passes`` passes, each measuring, back
to back: in-process onnxruntime float32 and int8 (throughput at the best
batch size, batch-1 p50/p99) and served float32 and int8 with raw uint8
tensors, asking for ``probabilities``: over V2 ``ModelInfer`` (throughput at
the best concurrency, p50/p99 at concurrency 1) and over ``ModelStreamInfer``
(16 requests outstanding on one stream, which saves each image a call's
setup), from ``serve_client``; and served float32 over the HTTP edge's KServe
v2 REST ``infer``, with JSON tensors and with the binary-data extension
(throughput at the best concurrency, c=1 p50/p99, keep-alive connections,
from ``http_client``), beside gRPC's. Single
back-to-back figures drift by +-30% on a shared 2-core machine, so figures
are medians over passes with their ranges, and ratios are taken within a
pass. Held-out accuracy of both
variants (Fashion-MNIST sample) comes from the quantization step. Last, the
server starts ``--restarts`` times on lite0 alone and each start's tuned
settings are listed (from ModelConfig), with each distinct choice's
in-process throughput measured in interleaved rounds: two starts may choose
differently only where the choices serve alike.

Targets (2-core CPU): served int8 >= 2x served float32 on lite0 with <= 0.5
point accuracy drop; served >= 85% of in-process on lite0, >= 80% on
lite0-96; served concurrency-1 p50 <= in-process batch-1 p50 + 1.5 ms; the
restarts' choices within 5% of each other in throughput.
Figures go to build/bench/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script (`make bench-serve`), so this folder is on sys.path.
from bench_models import fast_model, int8_model, lite0_model, small_model
from http_client import served_http
from serve_client import STREAM_WINDOW, Server, latency_ms, model_settings, served

from tlserve.contract.card import ModelCard
from tlserve.contract.images import prepare_image
from tlserve.contract.rules import CPU_PROVIDER

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
BATCHES = (1, 8, 32)
VARIANTS = ("float32", "int8")
TARGETS = {"lite0": 0.85, "lite0-96": 0.80, "fast": 0.80}
P50_OVERHEAD_MS = 1.5  # served c=1 p50 over in-process batch-1 p50, at most
HTTP_FORMS = ("json", "binary")  # KServe v2 REST infer: JSON tensors, binary-data extension


def _photo_jpeg(side: int = 640) -> bytes:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    image = image.resize((side, round(side * image.height / image.width)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def in_process(sessions: list[Any], row: np.ndarray, seconds: float) -> dict[str, float]:
    """The best of ``sessions`` (onnxruntime's default threads, and one thread: on a busy
    host the default's spinning threads can lose) by batch-1 p50 and by throughput."""
    found = [_in_process(s, row, seconds / len(sessions)) for s in sessions]
    fastest = min(found, key=lambda f: f["p50"])
    best = max(found, key=lambda f: f["throughput"])
    return {**fastest, "throughput": best["throughput"], "at": best["at"]}


def _in_process(session: Any, row: np.ndarray, seconds: float) -> dict[str, float]:
    """onnxruntime in this process: batch-1 latency, best throughput over BATCHES."""
    name = session.get_inputs()[0].name
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        session.run(None, {name: row})
        latencies.append(time.perf_counter() - started)
    best, best_batch = 0.0, 1
    for batch in BATCHES:
        feed = {name: np.repeat(row, batch, axis=0)}
        session.run(None, feed)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / len(BATCHES):
            session.run(None, feed)
            count += batch
        speed = count / (time.perf_counter() - started)
        if speed > best:
            best, best_batch = speed, batch
    return {"throughput": best, "at": best_batch, **latency_ms(latencies)}


def bench_model(name: str, path: Path, passes: int, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    card = ModelCard.from_props(
        dict(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map)
    )
    assert card is not None, f"{path} has no model card"
    row = prepare_image(_photo_jpeg(), card.preprocessing)[None]
    int8_path, quantized = int8_model(path)
    paths = {"float32": path, "int8": int8_path}
    models = {"float32": name, "int8": f"{name}-int8"}
    print(
        f"\n== {name}: {card.preprocessing.height} px; int8: {quantized['reason']} ==", flush=True
    )
    one_thread = ort.SessionOptions()
    one_thread.intra_op_num_threads = 1
    sessions = {
        v: [
            ort.InferenceSession(str(p), providers=[CPU_PROVIDER]),
            ort.InferenceSession(str(p), one_thread, providers=[CPU_PROVIDER]),
        ]
        for v, p in paths.items()
    }
    server = Server(path.parent.parent.parent, OUT)
    runs: list[dict[str, dict[str, float]]] = []
    try:
        for index in range(passes):
            figures: dict[str, dict[str, float]] = {}
            for variant in VARIANTS:  # in-process and served alternate within every pass
                figures[f"in-process {variant}"] = in_process(sessions[variant], row, seconds)
                figures[f"served {variant}"] = asyncio.run(
                    served(server.target, models[variant], row, seconds)
                )
            for form in HTTP_FORMS:  # the REST edge, float32, beside gRPC's row
                figures[f"http {form} float32"] = asyncio.run(
                    served_http(server.http_port, name, row, seconds, binary=form == "binary")
                )
            runs.append(figures)
            print(f"  pass {index + 1}/{passes} done", flush=True)
    finally:
        server.stop()
    results = {"passes": runs, "quantization": quantized}
    _print(name, results)
    return results


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def _print(name: str, results: dict[str, Any]) -> None:
    runs = results["passes"]
    print(f"{'':<20} {'best img/s':>24} {'at':>4} {'c=1 p50 ms':>22} {'c=1 p99 ms':>22}")
    for key in runs[0]:
        column = [r[key] for r in runs]
        at = statistics.median(f["at"] for f in column)
        print(f"{key:<20} {_spread([f['throughput'] for f in column], '.1f'):>24} {at:>4.0f} "
              f"{_spread([f['p50'] for f in column], '.2f'):>22} "
              f"{_spread([f['p99'] for f in column], '.2f'):>22}")  # fmt: skip
        if "stream" in column[0]:
            streamed = _spread([f["stream"] for f in column], ".1f")
            print(f"{'  on one stream':<20} {streamed:>24} {STREAM_WINDOW:>4}")
    ratios: dict[str, list[float]] = {}
    for variant in VARIANTS:
        for how, field in (("unary", "throughput"), ("stream", "stream")):
            ratios[f"served {how}/in-process {variant}"] = [
                r[f"served {variant}"][field] / r[f"in-process {variant}"]["throughput"]
                for r in runs
            ]
        ratios[f"c=1 p50 overhead {variant} (ms)"] = [
            r[f"served {variant}"]["p50"] - r[f"in-process {variant}"]["p50"] for r in runs
        ]
    for form in HTTP_FORMS:
        ratios[f"http {form}/gRPC unary float32"] = [
            r[f"http {form} float32"]["throughput"] / r["served float32"]["throughput"]
            for r in runs
        ]
        ratios[f"c=1 p50 http {form} - gRPC (ms)"] = [
            r[f"http {form} float32"]["p50"] - r["served float32"]["p50"] for r in runs
        ]
    ratios["in-process int8/float32"] = [
        r["in-process int8"]["throughput"] / r["in-process float32"]["throughput"] for r in runs
    ]
    for how, field in (("unary", "throughput"), ("stream", "stream")):
        ratios[f"served {how} int8/float32"] = [
            r["served int8"][field] / r["served float32"][field] for r in runs
        ]
    for key, values in ratios.items():
        print(f"  {key:<34} {_spread(values, '.2f')}")
    variants = results["quantization"]["variants"]
    accuracy = {v: variants[v]["accuracy"] for v in VARIANTS}
    if None not in accuracy.values():
        drop = 100 * (accuracy["float32"] - accuracy["int8"])
        print(f"  held-out accuracy ({results['quantization']['held_out']} images): float32 "
              f"{accuracy['float32']:.2%}, int8 {accuracy['int8']:.2%} (change {-drop:+.2f} "
              f"points); top-1 agreement {results['quantization']['agreement']:.1%}")  # fmt: skip
    else:
        print(f"  top-1 agreement int8 vs float32: {results['quantization']['agreement']:.1%} "
              "(random weights: no accuracy)")  # fmt: skip
    for variant in VARIANTS:
        extra = statistics.median(ratios[f"c=1 p50 overhead {variant} (ms)"])
        verdict = "met" if extra <= P50_OVERHEAD_MS else "MISSED"
        print(f"  target served c=1 p50 <= in-process batch-1 p50 + {P50_OVERHEAD_MS} ms, "
              f"{variant}: {extra:+.2f} ms ({verdict})")  # fmt: skip
    # Judged on the better of the two ways of calling, both printed above.
    target = TARGETS.get(name, 0.8)
    for how in ("unary", "stream"):
        ratio = statistics.median(ratios[f"served {how}/in-process float32"])
        verdict = "met" if ratio >= target else "MISSED"
        print(f"  target served/in-process float32 >= {target:.0%}, {how}: {ratio:.1%} ({verdict})")
    if name == "lite0":
        for how in ("unary", "stream"):
            speedup = statistics.median(ratios[f"served {how} int8/float32"])
            print(f"  target served int8 >= 2x served float32, {how}: {speedup:.2f}x "
                  f"({'met' if speedup >= 2 else 'MISSED'})", flush=True)  # fmt: skip
    results["summary"] = {k: statistics.median(v) for k, v in ratios.items()}


def restarts(path: Path, count: int, seconds: float) -> dict[str, Any]:
    """Start the server ``count`` times on ``path`` alone and list what tuning chose; then
    each distinct choice's in-process throughput, in interleaved rounds of ``seconds``."""
    from tlserve.server.models.runtime import OnnxModel
    from tlserve.server.models.tuning_search import measure

    repo = OUT / "models" / "restarts"
    (repo / "lite0" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, repo / "lite0" / "1" / "model.onnx")
    print(f"\n== {count} starts of lite0 float32 alone: what load-time tuning chose ==")
    print(f"{'start':>5} {'threads':>7} {'inst':>4} {'max batch':>9} {'lone':>4}  reason")
    starts = []
    for index in range(count):
        server = Server(repo, OUT)
        try:
            found = model_settings(server.target, "lite0")
        finally:
            server.stop()
        starts.append(found)
        print(f"{index + 1:>5} {found['intra_op_threads']:>7} {found['instances']:>4} "
              f"{found['max_batch_size']:>9} {found.get('lone_batch_threads', '-'):>4}  "
              f"{found.get('tuning', '')}", flush=True)  # fmt: skip
    keys = ("intra_op_threads", "instances", "max_batch_size")
    distinct = sorted({tuple(int(f[k]) for k in keys) for f in starts}, reverse=True)
    sessions = {t: OnnxModel(repo / "lite0" / "1" / "model.onnx", device="cpu",
                             intra_op_threads=t) for t, _, _ in distinct}  # fmt: skip
    speeds: dict[tuple[int, ...], list[float]] = {choice: [] for choice in distinct}
    for _ in range(3 if len(distinct) > 1 else 0):
        for threads, instances, batch in distinct:
            trial = measure(sessions[threads], threads, instances, batch, seconds)
            speeds[(threads, instances, batch)].append(trial.images_per_second)
    if len(distinct) > 1:
        best = max(statistics.median(v) for v in speeds.values())
        for (threads, instances, batch), values in speeds.items():
            median = statistics.median(values)
            print(f"  {threads} x {instances} at batch {batch}: {median:.1f} images/s in-process "
                  f"({median / best:.0%} of the best choice's)")  # fmt: skip
        worst = min(statistics.median(v) for v in speeds.values()) / best
        print(f"  target choices within 5% in throughput: {1 - worst:.1%} apart "
              f"({'met' if worst >= 0.95 else 'MISSED'})")  # fmt: skip
    else:
        print("  every start chose the same settings (target: met)")
    return {"starts": starts, "in_process": {str(k): v for k, v in speeds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--passes", type=int, default=3, help="alternating passes (>= 3)")
    parser.add_argument(
        "--models", default="lite0,lite0-96", help="comma-separated: lite0, lite0-96, fast"
    )
    parser.add_argument("--restarts", type=int, default=5, help="starts on lite0 (0: none)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    builders = {"lite0": lite0_model, "lite0-96": small_model, "fast": fast_model}
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    all_results = {}
    for name in args.models.split(","):
        path = builders[name](OUT / "models")
        all_results[name] = bench_model(name, path, args.passes, args.seconds)
    if args.restarts:
        lite0 = lite0_model(OUT / "models")
        all_results["restarts"] = restarts(lite0, args.restarts, args.seconds / 2)
    (OUT / "serve.json").write_text(json.dumps(all_results, indent=2, default=str))
    print(f"\nfigures: {OUT / 'serve.json'}")


if __name__ == "__main__":
    main()
