"""``make demo``: the whole path on the bundled example data, end to end.

Trains a classifier on ``examples/fashion-mnist`` with the pretrained
backbone, publishes it into a fresh model repository, starts ``tlserve
serve`` as a real process, classifies every test image through the client
SDK over gRPC, prints accuracy, the share of images out of distribution,
latency and a few metric lines, and stops
the server with SIGTERM as Kubernetes would.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tlserve.client import Client

ROOT = Path(__file__).resolve().parent.parent
_BATCH = 16


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(
    repo: Path, log_file: Path, http_port: int
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``tlserve serve`` on free ports; return it, its gRPC target and metrics URL."""
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tlserve.cli.main",
                "serve",
                "--model-repository",
                str(repo),
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
                "--http-port",
                str(http_port),
                "--drain-delay",
                "1",
            ],
            stderr=sink,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"gRPC on (\S+:\d+)\b.*?metrics on (\S+)", log_file.read_text())
        if match:
            return process, match.group(1), match.group(2)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not start; its log:\n{log_file.read_text()}")


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _data_check_summary(version_dir: Path, data_dir: Path) -> str:
    """The data check's one line: from the training report, else checked now (cached features)."""
    from tlserve.training.check.datacheck import check_folder
    from tlserve.training.report.record import RunRecord

    check = RunRecord.load(version_dir).data_check
    if check:
        return check.summary()

    return check_folder(data_dir).summary()


def _photos_flagged(client: Client) -> tuple[int, int] | None:
    """How many of scikit-image's natural photos the model flags (None without scikit-image)."""
    try:
        import skimage.data
    except ImportError:
        return None
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee",
              "rocket", "camera", "coins", "moon", "hubble_deep_field")]  # fmt: skip
    results = client.classify(photos, model="fashion", top_k=1, timeout=30)
    return sum(bool(getattr(r, "out_of_distribution", False)) for r in results), len(results)


def run(data_dir: Path, work_dir: Path) -> None:
    from tlserve.training import train

    repo = work_dir / "models"
    shutil.rmtree(repo, ignore_errors=True)
    # The demo asks for the last-layer probe: it is the fastest path to a served
    # model. `tlserve train` without --strategy scores the candidates (auto).
    print(f"== 1. train on {data_dir} (pretrained tf_efficientnet_lite0, linear head)")
    result = train(data_dir, model_repository=repo, name="fashion", strategy="linear")
    print(result.summary())
    print(_data_check_summary(result.version_dir, data_dir))

    print("\n== 2. serve the repository over gRPC and HTTP")
    http_port = _free_port()
    process, target, metrics_url = _start_server(repo, work_dir / "server.log", http_port)
    try:
        with Client(target) as client:
            client.wait_until_ready(timeout=120)
            meta = client.model_metadata("fashion", timeout=10)
            print(
                f"serving 'fashion' version {meta.versions[0]} on {target} "
                f"({meta.execution_provider}); metrics at {metrics_url}"
            )
            print(f"the model page (KServe v2 REST beside it): http://127.0.0.1:{http_port}/")

            print("\n== 3. classify the test images through the client SDK")
            files = sorted((data_dir / "test").rglob("*.png"))
            correct = flagged = 0
            started = time.perf_counter()
            for i in range(0, len(files), _BATCH):
                chunk = files[i : i + _BATCH]
                results = client.classify(chunk, model="fashion", top_k=1, timeout=30)
                correct += sum(
                    r[0].label == f.parent.name for f, r in zip(chunk, results, strict=True)
                )
                flagged += sum(bool(getattr(r, "out_of_distribution", False)) for r in results)
            batch_seconds = time.perf_counter() - started
            photos = _photos_flagged(client)
            latencies = []
            for path in files[:100]:
                t0 = time.perf_counter()
                client.classify(path, model="fashion", top_k=1, timeout=10)
                latencies.append((time.perf_counter() - t0) * 1000)
        print(f"test accuracy over gRPC: {correct}/{len(files)} = {correct / len(files):.1%}")
        print(
            f"out of distribution: {flagged}/{len(files)} = {flagged / len(files):.1%} of the "
            "test images (the threshold lets ~1% of training-like images through)"
            + (f"; {photos[0]}/{photos[1]} natural photos" if photos else "")
        )
        print(f"batches of {_BATCH}: {len(files) / batch_seconds:.0f} images/s")
        print(
            f"one image per call: p50 {_percentile(latencies, 50):.1f} ms, "
            f"p90 {_percentile(latencies, 90):.1f} ms, p99 {_percentile(latencies, 99):.1f} ms"
        )

        print("\n== 4. the same over HTTP: one image's bytes, as curl would send them")
        sample = files[0]
        url = f"http://127.0.0.1:{http_port}/v2/models/fashion/classify?top_k=1"
        request = urllib.request.Request(
            url, data=sample.read_bytes(), headers={"Content-Type": "image/png"}
        )
        result = json.loads(urllib.request.urlopen(request, timeout=10).read())["results"][0]
        top = result["labels"][0]
        print(f"  curl -H 'Content-Type: image/png' --data-binary @{sample} '{url}'")
        print(
            f"  -> {top['label']} ({top['score']:.2f}), "
            f"out of distribution: {result['out_of_distribution']}"
        )

        print("\n== 5. a few lines of the metrics page")
        page = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        wanted = (
            "tlserve_requests_total{",
            "tlserve_batch_size_count",
            "tlserve_batch_size_sum",
            "tlserve_compute_duration_seconds_sum",
            "tlserve_model_loaded{",
            "tlserve_ood_flagged_images_total{",
            "tlserve_ood_score_ratio_count{",
        )
        for line in page.splitlines():
            if line.startswith(wanted):
                print("  " + line)
    finally:
        print("\n== 6. SIGTERM: drain and stop")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        print(f"server exited with status {code}; its log is {work_dir / 'server.log'}")
    print(
        "\nNext: train on your own images with\n"
        "  .venv/bin/tlserve train PATH/TO/IMAGES --model-repository models --name NAME"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "fashion-mnist")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "demo")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run(args.data, args.work_dir)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
