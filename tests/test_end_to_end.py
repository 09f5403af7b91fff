"""train → export → publish → serve → classify, on a tiny model, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.support import ServerThread
from tests.training.shapes import SHAPES, TINY_BACKBONE, write_shapes
from tlserve.client import Client
from tlserve.contract.images import prepare_image


@pytest.mark.slow
def test_train_serve_classify(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    write_shapes(data / "train", 12, seed=1)
    write_shapes(data / "test", 6, seed=2)
    repo = tmp_path / "models"
    trained = subprocess.run(
        [sys.executable, "-m", "tlserve.cli.main", "train", str(data),
         "--model-repository", str(repo), "--name", "shapes", "--backbone", TINY_BACKBONE],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "held-out accuracy on test/" in trained.stdout
    assert "calibration: T=" in trained.stdout and "T = " in trained.stdout  # and why
    model_file = repo / "shapes" / "1" / "model.onnx"
    assert str(model_file) in trained.stdout

    server = ServerThread(repo)
    try:
        with Client(server.target) as client:
            meta = client.model_metadata("shapes", timeout=10)
            assert meta.card is not None and meta.card.labels == tuple(sorted(SHAPES))
            test_files = sorted((data / "test").rglob("*.png"))
            results = client.classify(test_files, model="shapes", top_k=3, timeout=30)
            correct = sum(
                r[0].label == f.parent.name for f, r in zip(test_files, results, strict=True)
            )
            assert correct / len(test_files) > 0.6  # chance is 1/3

            # The Open Inference Protocol path, raw contents, equals onnxruntime in-process.
            batch = np.stack([prepare_image(f, meta.card.preprocessing) for f in test_files[:5]])
            served = client.infer("shapes", {"images": batch}, timeout=10)
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        [local] = session.run(["probabilities"], {"images": batch})
        np.testing.assert_allclose(served["probabilities"], local, rtol=0, atol=1e-6)
        # Classify's server-side preprocessing gives the same scores as the tensors path.
        top = [r[0] for r in results[:5]]
        np.testing.assert_allclose([p.score for p in top], local.max(axis=1), atol=1e-6)
    finally:
        server.stop()
