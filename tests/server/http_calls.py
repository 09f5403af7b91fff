"""Calls to a server's HTTP port as any HTTP client makes them (http.client, no SDK)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tests.support import build_tiny_classifier, png_bytes


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Answer:
    connection: http.client.HTTPConnection
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=context
        )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def infer_json(array: np.ndarray, name: str = "images", **extra: Any) -> bytes:
    """A v2 JSON infer request with one input tensor."""
    tensor = {
        "name": name, "shape": list(array.shape), "datatype": _datatype(array),
        "data": array.ravel().tolist(),
    }  # fmt: skip
    return json.dumps({"inputs": [tensor], **extra}).encode()


def infer_binary(
    array: np.ndarray, outputs: list[str] | None = None, name: str = "images"
) -> tuple[bytes, dict[str, str]]:
    """A binary-data infer request (its body and headers) asking for binary outputs."""
    raw = np.ascontiguousarray(array).tobytes()
    document: dict[str, Any] = {
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": _datatype(array),
                    "parameters": {"binary_data_size": len(raw)}}],
    }  # fmt: skip
    if outputs is not None:
        document["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    else:
        document["parameters"] = {"binary_data_output": True}
    header = json.dumps(document).encode()
    return header + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def binary_outputs(answer: Answer) -> dict[str, np.ndarray]:
    """The output tensors of a binary-data answer (JSON ones too)."""
    length = int(answer.headers["inference-header-content-length"])
    document = json.loads(answer.body[:length])
    arrays, offset = {}, length
    dtypes = {"FP32": np.float32, "UINT8": np.uint8, "INT64": np.int64}
    for tensor in document["outputs"]:
        dtype = np.dtype(dtypes[tensor["datatype"]])
        if "data" in tensor:
            arrays[tensor["name"]] = np.array(tensor["data"], dtype).reshape(tensor["shape"])
            continue
        size = tensor["parameters"]["binary_data_size"]
        chunk = answer.body[offset : offset + size]
        arrays[tensor["name"]] = np.frombuffer(chunk, dtype).reshape(tensor["shape"])
        offset += size
    return arrays


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` as it is on a new connection; everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def _datatype(array: np.ndarray) -> str:
    return {"uint8": "UINT8", "float32": "FP32", "int64": "INT64", "bool": "BOOL"}[str(array.dtype)]


def build_http_repository(repo: Path) -> None:
    """What the HTTP tests serve: ``tiny`` (no OOD score) and ``watched``, the tiny
    classifier with an ``ood_score`` fitted on saturated colours and a training
    report (a table, a figure) beside it."""
    from onnx import helper

    from tlserve.contract.card import ModelCard
    from tlserve.training.check.ood import add_ood_output, fit_ood

    build_tiny_classifier(repo / "tiny" / "1" / "model.onnx")
    path = repo / "watched" / "1" / "model.onnx"
    build_tiny_classifier(path)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    colours = np.full((300, 3), 0.08) + rng.normal(scale=0.03, size=(300, 3))
    colours[np.arange(300), labels] = 0.9
    scorer = fit_ood(colours, labels).with_threshold(
        colours + rng.normal(scale=0.02, size=colours.shape)
    )
    model = onnx.load(str(path))
    add_ood_output(model, scorer, batch_axis="batch")
    card = ModelCard.from_props({p.key: p.value for p in model.metadata_props})
    assert card is not None
    del model.metadata_props[:]
    card = scorer.on_card(card)
    card = dataclasses.replace(card, metrics={**card.metrics, "test_accuracy": 0.9})
    helper.set_model_props(model, card.to_props())
    onnx.save(model, str(path))
    (path.parent / "report.md").write_text(REPORT)
    (path.parent / "confusion.png").write_bytes(png_bytes((10, 10, 200), (40, 40)))


#: A training report as training writes them, plus text that must stay text.
REPORT = """# watched: linear on mean-colour

Created today, **accuracy 90.0%**, `seed 0`.

| class | precision | recall |
|---|---|---|
| red | 90.0% | 91.0% |
| <script>alert(1)</script> | 1 | 2 |

- a list item
- another

![confusion](confusion.png)
![escape](../../secret.png)
"""
