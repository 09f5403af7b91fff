"""bench-serve's side of the wire: the server process it starts, the generator
(ModelInfer and ModelStreamInfer calls, serialised once), and what a served
model's load-time tuning chose (ModelConfig's parameters).

The generator runs on the same two cores as the server, so it costs what
gRPC costs and no more: the SDK's Python around each call (0.1-0.3 ms of
CPU here) would come out of the server's share.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlserve.client import Client
from tlserve.contract.codec import encode_request_inputs
from tlserve.contract.rules import OUTPUT_PROBABILITIES
from tlserve.protos import grpc_service_pb2 as pb

CONCURRENCY = (1, 4, 16, 32)
# Answers outstanding on the ModelStreamInfer stream: as many as the best unary concurrency.
STREAM_WINDOW = 16
# What a classifying caller asks for. Unasked, V2 returns every output, here
# also the 1280-float embeddings (5 KB an answer to encode, send and parse):
# 624 against 655 and 619 against 706 images/s in two alternating passes on
# lite0-96 at 16 in flight (raw-bytes client), which in-process does not pay.
WANTED = (OUTPUT_PROBABILITIES,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``tlserve serve`` in a subprocess, on free ports."""

    def __init__(self, repo: Path, out: Path, env: dict[str, str] | None = None) -> None:
        self.grpc_port, self.metrics_port = _free_port(), _free_port()
        self.http_port = _free_port()  # the REST edge (bench/http_client.py)
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.log = (out / f"server-{repo.name}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tlserve.cli.main", "serve", "--model-repository", str(repo),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
             "--http-port", str(self.http_port),
             "--drain-delay", "0", "--grace", "2"],
            env={**os.environ, "TLSERVE_DEVICE": "cpu", **(env or {})},
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        with Client(self.target) as client:
            client.wait_until_ready(timeout=300)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def latency_ms(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 of ``latencies`` (seconds) in milliseconds."""
    ms = np.asarray(latencies) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def _request_bytes(model: str, row: np.ndarray) -> bytes:
    """The ModelInfer request for one image, serialised once."""
    request = pb.ModelInferRequest(
        model_name=model,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in WANTED],
    )
    encode_request_inputs(request, {"images": row})
    return request.SerializeToString()


def _check(answer: pb.ModelInferResponse, model: str) -> None:
    if answer.model_name != model or [o.name for o in answer.outputs] != list(WANTED):
        raise RuntimeError(f"unexpected answer from {model!r}: {answer}")


async def served(target: str, model: str, row: np.ndarray, seconds: float) -> dict[str, float]:
    """Closed loop over ModelInfer: p50/p99 at concurrency 1, best throughput over
    CONCURRENCY; then ModelStreamInfer, STREAM_WINDOW answers outstanding on one stream."""
    import grpc

    payload = _request_bytes(model, row)
    result: dict[str, float] = {"throughput": 0.0, "at": 1}
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for concurrency in CONCURRENCY:
            latencies: list[float] = []
            for _ in range(concurrency):  # warm the channel and the model
                _check(await call(payload, timeout=30), model)
            stop_at = time.perf_counter() + (seconds if concurrency == 1 else seconds / 2)

            async def worker(out: list[float] = latencies, stop: float = stop_at) -> None:
                while time.perf_counter() < stop:
                    started = time.perf_counter()
                    _check(await call(payload, timeout=30), model)
                    out.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            speed = len(latencies) / (time.perf_counter() - started)
            if concurrency == 1:
                result.update(latency_ms(latencies))
            if speed > result["throughput"]:
                result["throughput"], result["at"] = speed, concurrency
        result["stream"] = await _streamed(channel, model, payload, seconds / 2)
    return result


async def _streamed(channel: Any, model: str, payload: bytes, seconds: float) -> float:
    """Images/s over one ModelStreamInfer stream with STREAM_WINDOW requests outstanding."""
    window = asyncio.Semaphore(STREAM_WINDOW)
    stop_at = time.perf_counter() + seconds

    async def requests() -> Any:
        while time.perf_counter() < stop_at:
            await window.acquire()
            yield payload

    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    answers, started = 0, time.perf_counter()
    async for answer in stream(requests(), timeout=seconds + 30):
        if answer.error_message:
            raise RuntimeError(f"{model!r} answered on the stream: {answer.error_message}")
        _check(answer.infer_response, model)
        answers += 1
        window.release()
    return answers / (time.perf_counter() - started)


def model_settings(target: str, model: str) -> dict[str, str]:
    """ModelConfig's ``parameters`` for ``model``: the settings it serves with, each
    with its ``_source``, ``lone_batch_threads`` when set, and ``tuning``, the reason."""
    import grpc

    from tlserve.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
    return {key: value.string_value for key, value in config.parameters.items()}
