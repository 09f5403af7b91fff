"""bench-serve's HTTP side: KServe v2 REST ``infer`` calls, JSON and binary-data.

Like the gRPC generator (``serve_client``), each request is serialised once
and sent as it is over keep-alive HTTP/1.1 connections, one per caller in
flight; answers are read with httptools' parser (the one the server uses),
so the generator costs the two shared cores as little as gRPC's does and
the figures compare the two edges, not two clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httptools
import numpy as np
from serve_client import CONCURRENCY, WANTED, latency_ms


def request_bytes(port: int, model: str, row: np.ndarray, binary: bool) -> bytes:
    """One POST /v2/models/<model>/infer asking for WANTED, serialised."""
    tensor: dict[str, Any] = {"name": "images", "shape": list(row.shape), "datatype": "UINT8"}
    if binary:
        raw = np.ascontiguousarray(row).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        outputs = [{"name": n, "parameters": {"binary_data": True}} for n in WANTED]
        header = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
        body = header + raw
        extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
    else:
        tensor["data"] = row.ravel().tolist()
        body = json.dumps({"inputs": [tensor], "outputs": [{"name": n} for n in WANTED]}).encode()
        extra = ""
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {'application/octet-stream' if binary else 'application/json'}\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Connection:
    """One keep-alive connection; :meth:`call` sends a request and reads its answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._done = False
        self._status = 0
        self._body: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._done = True

    async def call(self, payload: bytes) -> bytes:
        self._done, self._body = False, []
        self.writer.write(payload)
        while not self._done:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._parser.feed_data(chunk)
        status = self._parser.get_status_code()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {b''.join(self._body)[:300]!r}")
        return b"".join(self._body)


async def served_http(
    port: int, model: str, row: np.ndarray, seconds: float, *, binary: bool
) -> dict[str, float]:
    """Closed loop over REST infer: p50/p99 at concurrency 1, best throughput over CONCURRENCY."""
    payload = request_bytes(port, model, row, binary)
    result: dict[str, float] = {"throughput": 0.0, "at": 1}
    for concurrency in CONCURRENCY:
        connections = [
            _Connection(*await asyncio.open_connection("127.0.0.1", port))
            for _ in range(concurrency)
        ]
        for connection in connections:  # warm the connections and the model
            await connection.call(payload)
        latencies: list[float] = []
        stop_at = time.perf_counter() + (seconds if concurrency == 1 else seconds / 2)

        async def worker(
            connection: _Connection, stop: float = stop_at, out: list[float] = latencies
        ) -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await connection.call(payload)
                out.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in connections))
        speed = len(latencies) / (time.perf_counter() - started)
        for connection in connections:
            connection.writer.close()
        if concurrency == 1:
            result.update(latency_ms(latencies))
        if speed > result["throughput"]:
            result["throughput"], result["at"] = speed, concurrency
    return result
