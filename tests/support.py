"""Test helpers every suite uses: a tiny real ONNX classifier, PNG bytes, a real server.

Plain functions and classes, imported by the tests that need them; the
fixtures built on them live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from tlserve.contract.card import ModelCard, Preprocessing

__all__ = [
    "TINY_LABELS",
    "TINY_SIZE",
    "ServerThread",
    "build_tiny_classifier",
    "free_port",
    "png_bytes",
]

TINY_LABELS = ("red", "green", "blue")
TINY_SIZE = 8


def build_tiny_classifier(
    path: Path, *, labels: tuple[str, ...] = TINY_LABELS, size: int = TINY_SIZE
) -> None:
    """A real tlserve-shaped ONNX model: uint8 NHWC images -> probabilities, embeddings.

    The embedding is the mean colour; the class is the dominant channel.
    """
    n = len(labels)
    weights = np.zeros((3, n), dtype=np.float32)
    for i in range(n):
        weights[i % 3, i] = 20.0
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["scaled"]),
        helper.make_node("ReduceMean", ["scaled"], ["embeddings"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["embeddings", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
            helper.make_tensor("weights", TensorProto.FLOAT, [3, n], weights.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        labels=labels,
        preprocessing=Preprocessing(
            height=size, width=size, crop_pct=1.0, interpolation="bilinear",
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        ),
        backbone="mean-colour",
        strategy="fixture",
    )  # fmt: skip
    helper.set_model_props(model, card.to_props())
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a listener whose 0 means off)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


class ServerThread:
    """A real tlserve server on 127.0.0.1:0, its event loop in a thread (HTTP off unless
    ``http_port`` is given: :func:`free_port`).

    Sync clients in the test's thread then talk to it as any service would.
    """

    def __init__(self, repo: Path, **overrides: object) -> None:
        from tlserve.server.config import ServerConfig
        from tlserve.server.edge.app import RunningServer, start_server

        self.config = ServerConfig.load(
            {"model_repository": repo, "grpc_port": 0, "metrics_port": 0, "http_port": 0,
             "drain_delay": 0.0, "grace": 1.0, **overrides},
            environ={},
        )  # fmt: skip
        self.loop = asyncio.new_event_loop()
        started: Future[RunningServer] = Future()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                started.set_result(self.loop.run_until_complete(start_server(self.config)))
            except BaseException as exc:
                started.set_exception(exc)
                return
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.running = started.result(timeout=60)
        self.target = self.running.target
        self.metrics_url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        # HTTP is off unless a test passes http_port (a free one: 0 means off).
        self.http_url = f"http://127.0.0.1:{self.running.http_port}"

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.call(self.running.stop(drain_delay=0.0, grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def write_test_pki(folder: Path) -> Path:
    """A throwaway P-256 CA (``ca.pem``/``ca.key``) in ``folder``, a server certificate for
    localhost and 127.0.0.1 (``server.pem``/``server.key``) and a client certificate
    (``client.pem``/``client.key``), both signed by it; returns ``folder``."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=folder)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=tlserve test CA",
             "-days", "2", "-sha256", "-out", "ca.pem", cwd=folder)  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key",
                 cwd=folder)  # fmt: skip
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
                 "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        (folder / f"{name}.ext").write_text(extensions)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=folder)  # fmt: skip
    return folder
