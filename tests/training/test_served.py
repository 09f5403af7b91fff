"""Every kind of model is served by the server unchanged: trees, earlier layer, finetune."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.support import ServerThread
from tests.training.shapes import TINY_BACKBONE
from tlserve.client import Client
from tlserve.contract.images import prepare_image
from tlserve.training import train


@pytest.mark.slow
def test_trees_earlier_layer_and_finetune_models_serve(shapes_folder: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    runs = {
        "trees": ("trees", {"layer": -2}),
        "finetune": ("finetune", {"epochs": 1, "lr": 3e-3}),
    }
    results = {
        name: train(
            shapes_folder,
            model_repository=repo,
            name=name,
            strategy=strategy,
            backbone=TINY_BACKBONE,
            workers=0,
            cache=False,
            options=options,
        )
        for name, (strategy, options) in runs.items()
    }
    files = sorted((shapes_folder / "test").rglob("*.png"))[:6]
    server = ServerThread(repo)
    try:
        with Client(server.target) as client:
            for name, result in results.items():
                meta = client.model_metadata(name, timeout=10)
                assert meta.card is not None and meta.card.strategy == result.strategy
                batch = np.stack([prepare_image(f, meta.card.preprocessing) for f in files])
                served = client.infer(name, {"images": batch}, timeout=30)
                session = ort.InferenceSession(
                    str(result.model_path), providers=["CPUExecutionProvider"]
                )
                local = session.run(["probabilities", "embeddings"], {"images": batch})
                np.testing.assert_allclose(served["probabilities"], local[0], atol=1e-6)
                np.testing.assert_allclose(served["embeddings"], local[1], atol=1e-5)
                labels = client.classify(files, model=name, top_k=1, timeout=30)
                assert len(labels) == len(files)
    finally:
        server.stop()
