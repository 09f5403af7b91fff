"""The out-of-distribution score, served: Classify, ModelInfer, the CLI, metrics, old models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ServerThread, build_tiny_classifier, png_bytes
from tlserve.client import Client
from tlserve.contract.card import ModelCard
from tlserve.contract.predictions import Classification
from tlserve.training.check.ood import OodScorer, add_ood_output, fit_ood

RED, GREY = (230, 20, 20), (128, 128, 128)


def _tiny_with_ood(path: Path) -> OodScorer:
    """The tiny mean-colour classifier, plus ood_score fitted on saturated colours."""
    build_tiny_classifier(path)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    colours = np.full((300, 3), 0.08) + rng.normal(scale=0.03, size=(300, 3))
    colours[np.arange(300), labels] = 0.9
    scorer = fit_ood(colours, labels)
    scorer = scorer.with_threshold(colours + rng.normal(scale=0.02, size=colours.shape))
    model = onnx.load(str(path))
    add_ood_output(model, scorer, batch_axis="batch")
    card = ModelCard.from_props({p.key: p.value for p in model.metadata_props})
    assert card is not None
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, scorer.on_card(card).to_props())
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return scorer


@pytest.fixture
def ood_server(tmp_path: Path) -> Iterator[tuple[ServerThread, OodScorer]]:
    repo = tmp_path / "models"
    scorer = _tiny_with_ood(repo / "watched" / "1" / "model.onnx")
    build_tiny_classifier(repo / "old" / "1" / "model.onnx")
    running = ServerThread(repo)
    yield running, scorer
    running.stop()


def test_classify_carries_the_score_and_the_flag(
    ood_server: tuple[ServerThread, OodScorer],
) -> None:
    server, scorer = ood_server
    with Client(server.target) as client:
        red, grey = client.classify([png_bytes(RED), png_bytes(GREY)], model="watched", top_k=2)
        assert isinstance(red, Classification) and red[0].label == "red"
        assert red.ood_score is not None and grey.ood_score is not None
        expected = scorer.score(np.array([RED, GREY], np.float64) / 255.0)
        np.testing.assert_allclose([red.ood_score, grey.ood_score], expected, rtol=1e-4)
        assert scorer.threshold is not None and red.ood_score < scorer.threshold < grey.ood_score
        assert not red.out_of_distribution and grey.out_of_distribution
        # V2 ModelInfer returns the score as one more output.
        outputs = client.infer("watched", {"images": np.full((2, 8, 8, 3), 128, np.uint8)})
        assert outputs["ood_score"].shape == (2,) and outputs["ood_score"].dtype == np.float32
        streamed = list(client.classify_stream([png_bytes(GREY)], model="watched"))
        assert streamed[0].predictions.out_of_distribution

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("tlserve_ood_score_ratio_count", (("model", "watched"),))] == 3
    # The grey images are above the threshold, so above 1 in the ratio.
    at_one = ("tlserve_ood_score_ratio_bucket", (("le", "1.0"), ("model", "watched")))
    assert samples[at_one] == 1
    flagged = ("tlserve_ood_flagged_images_total", (("model", "watched"), ("version", "1")))
    assert samples[flagged] == 2


def test_a_model_without_the_output_still_serves(
    ood_server: tuple[ServerThread, OodScorer],
) -> None:
    server, _ = ood_server
    with Client(server.target) as client:
        (result,) = client.classify([png_bytes(GREY)], model="old")
        assert result[0].label in {"red", "green", "blue"}
        assert result.ood_score is None and not result.out_of_distribution


def test_client_side_preprocessing_carries_the_same_score(
    ood_server: tuple[ServerThread, OodScorer],
) -> None:
    server, _ = ood_server
    images = [png_bytes(RED), png_bytes(GREY)]
    with Client(server.target) as client:
        served = client.classify(images, model="watched", top_k=2)
        local = client.classify(images, model="watched", top_k=2, preprocess="client")
        old = client.classify([png_bytes(GREY)], model="old", preprocess="client")
    assert [r.out_of_distribution for r in local] == [r.out_of_distribution for r in served]
    np.testing.assert_allclose(
        [r.ood_score for r in local], [r.ood_score for r in served], rtol=1e-5
    )
    assert old[0].ood_score is None and not old[0].out_of_distribution


def test_cli_json_prints_score_and_flag(
    ood_server: tuple[ServerThread, OodScorer], tmp_path: Path
) -> None:
    server, _ = ood_server
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a-red.png").write_bytes(png_bytes(RED))
    (folder / "b-grey.png").write_bytes(png_bytes(GREY))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TLSERVE_")}
    rows = {}
    for model in ("watched", "old"):
        done = subprocess.run(
            [sys.executable, "-m", "tlserve.cli.main", "classify", "--target", server.target,
             "--model", model, "--json", str(folder)],
            capture_output=True, text=True, timeout=120, env=environ,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows[model] = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["out_of_distribution"] for r in rows["watched"]] == [False, True]
    assert all(isinstance(r["ood_score"], float) for r in rows["watched"])
    assert [(r["ood_score"], r["out_of_distribution"]) for r in rows["old"]] == [(None, False)] * 2


FASHION = Path(__file__).resolve().parents[2] / "examples" / "fashion-mnist"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # embeds 1,300 images with the real backbone on a CPU
def test_example_model_flags_photos_through_a_real_server(tmp_path: Path) -> None:
    """The example model, exported with its score, served: photos score above garments."""
    import io

    from PIL import Image

    from tlserve.training.artifact.export import export_onnx
    from tlserve.training.artifact.publish import publish
    from tlserve.training.backbone.backbones import create_backbone
    from tlserve.training.check.ood import fit_for_model, ood_auroc, reference_ood_images
    from tlserve.training.data.folders import load_dataset
    from tlserve.training.features.extract import load_images
    from tlserve.training.fit.strategies import FitContext
    from tlserve.training.fit.strategies.linear import LinearProbe

    dataset = load_dataset(FASHION)
    net = create_backbone("tf_efficientnet_lite0")
    context = FitContext(classes=dataset.classes, backbone=net, splits=dataset.splits())
    fitted = LinearProbe(c_grid=(0.01,)).fit(context)  # the score does not depend on C
    scorer = fit_for_model(context, fitted)
    card = ModelCard(labels=dataset.classes, preprocessing=net.preprocessing, strategy="linear")
    exported = tmp_path / "model.onnx"
    samples = load_images([p for p, _ in dataset.test], card.preprocessing, limit=4)
    check = export_onnx(fitted.embedder, fitted.head, card, exported, samples, ood=scorer)
    assert check.ood_score_max_rel_diff is not None
    publish(exported, tmp_path / "models", "fashion", {})

    photos = []
    for row in reference_ood_images(net.preprocessing)[::5]:  # type: ignore[index]
        buffer = io.BytesIO()
        Image.fromarray(row).save(buffer, format="PNG")
        photos.append(buffer.getvalue())
    garments = [path.read_bytes() for path, _ in dataset.test]
    server = ServerThread(tmp_path / "models")
    try:
        with Client(server.target) as client:
            inside = [
                r
                for i in range(0, len(garments), 50)
                for r in client.classify(garments[i : i + 50], model="fashion", timeout=120)
            ]
            outside = client.classify(photos, model="fashion", timeout=120)  # fmt: skip
    finally:
        server.stop()
    scores_in = np.array([r.ood_score for r in inside], np.float64)
    scores_out = np.array([r.ood_score for r in outside], np.float64)
    assert ood_auroc(scores_in, scores_out) >= 0.95
    assert np.mean([r.out_of_distribution for r in outside]) >= 0.9
    assert np.mean([r.out_of_distribution for r in inside]) <= 0.05
