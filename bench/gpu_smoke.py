"""GPU smoke test and figures, run by bench/gpu_check.sh on a lent GPU machine.

1. onnxruntime in-process on CPU and on CUDA (I/O binding): batch-1 latency
   and batch-32 throughput, outputs compared between the two.
2. A real server with ``device=cuda, gpu_fallback=fail``: ready, ModelMetadata
   names CUDAExecutionProvider, ModelInfer answers, and /metrics carries the
   NVML GPU memory/utilisation gauges.

Writes ``gpu_figures.json`` under ``--out``. Without CUDA it measures the CPU
side, says so, and exits 1 (``--allow-cpu``: exit 0, for a dry run here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from bench_models import DEMO_MODEL, fast_model

from tlserve.client import AsyncClient
from tlserve.server.config import ServerConfig
from tlserve.server.edge.app import start_server
from tlserve.server.models.runtime import CUDA, OnnxModel, ProviderError


def _model_path(work: Path) -> Path:
    if DEMO_MODEL.is_file():  # carry build/demo/models to the GPU machine to use lite0
        return DEMO_MODEL
    return fast_model(work)


def _time(model: OnnxModel, rows: np.ndarray) -> dict[str, float]:
    one = rows[:1]
    for _ in range(5):
        model.run({"images": one})
    latencies = []
    for _ in range(50):
        started = time.perf_counter()
        model.run({"images": one})
        latencies.append(time.perf_counter() - started)
    model.run({"images": rows})
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < 2.0:
        model.run({"images": rows})
        count += len(rows)
    return {
        "batch1_p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "batch32_images_per_s": count / (time.perf_counter() - started),
    }


async def _serve_on_cuda(path: Path, rows: np.ndarray) -> dict[str, Any]:
    repo, name = path.parent.parent.parent, path.parent.parent.name
    config = ServerConfig.load(
        {"model_repository": repo, "grpc_port": 0, "metrics_port": 0, "device": "cuda",
         "gpu_fallback": "fail", "drain_delay": 0.0, "grace": 1.0},
        environ={},
    )  # fmt: skip
    running = await start_server(config)
    try:
        async with AsyncClient(running.target, timeout=30) as client:
            ready = await client.server_ready()
            meta = await client.model_metadata(name)
            outputs = await client.infer(name, {"images": rows[:8]})
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        scrape = urllib.request.urlopen(url, timeout=5).read().decode()
        gpu_lines = [line for line in scrape.splitlines() if line.startswith("tlserve_gpu_")]
        return {
            "ready": ready,
            "provider": meta.execution_provider,
            "probabilities_shape": list(outputs["probabilities"].shape),
            "nvml_metrics": gpu_lines,
        }
    finally:
        await running.stop(drain_delay=0.0, grace=1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/gpu"))
    parser.add_argument("--allow-cpu", action="store_true", help="exit 0 without CUDA")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tlserve-gpu-"))
    path = _model_path(work)
    cpu = OnnxModel(path, device="cpu")
    spec = cpu.inputs[0]
    rows = np.random.default_rng(0).integers(0, 256, (32, *spec.shape[1:]), np.uint8)
    figures: dict[str, Any] = {"model": str(path), "cpu": _time(cpu, rows)}
    try:
        gpu = OnnxModel(path, device="cuda", gpu_fallback="fail")
    except ProviderError as exc:
        figures["cuda"] = {"error": str(exc)}
        gpu = None
    if gpu is not None:
        assert gpu.provider == CUDA and gpu.io_binding, (gpu.provider, gpu.io_binding)
        want, got = cpu.run({"images": rows}), gpu.run({"images": rows})
        worst = max(float(np.abs(want[k] - got[k]).max()) for k in want)
        figures["cuda"] = {**_time(gpu, rows), "io_binding": True, "max_abs_diff_vs_cpu": worst}
        figures["server"] = asyncio.run(_serve_on_cuda(path, rows))
    (args.out / "gpu_figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    if gpu is None:
        print("CUDA is not usable here: only the CPU figures were measured")
        return 0 if args.allow_cpu else 1
    server = figures["server"]
    ok = server["ready"] and server["provider"] == CUDA and bool(server["nvml_metrics"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
