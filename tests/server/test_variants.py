"""The serving host decides which variant serves: checked on the reference set, timed here.

Real versions on disk (a tiny convolutional classifier, its real int8
quantization, a real reference set) served by a real server; the int8 file
that "saturates" is made by corrupting its weight scales, which is what
saturation does to a model's answers on a CPU without VNNI.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from tests.support import ServerThread
from tests.training.conv_model import build_conv_classifier, colour_images, reference_for
from tlserve.client import Client
from tlserve.contract.errors import NotAllowed
from tlserve.contract.variants import ReferenceSet
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.server.config import ServerConfig
from tlserve.server.models.variants import choose_variant
from tlserve.training.artifact.int8 import quantize_int8


def make_version(version_dir: Path, *, corrupt: bool = False, reference: bool = True) -> Path:
    """model.onnx (float32), model.int8.onnx and reference.npz, as training publishes them."""
    model = build_conv_classifier(version_dir / "model.onnx")
    int8 = version_dir / "model.int8.onnx"
    quantize_int8(model, int8, colour_images(30).images)
    if corrupt:
        corrupt_weight_scales(int8)
    if reference:
        (version_dir / "reference.npz").write_bytes(reference_for(model).to_bytes())
    return version_dir


def corrupt_weight_scales(path: Path) -> None:
    """Flip the sign of the first convolution's per-channel weight scales."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        value = onnx.numpy_helper.to_array(init)
        if init.name == "conv1_scale":
            init.CopyFrom(onnx.numpy_helper.from_array(-value, init.name))
    onnx.save(model, str(path))


def _config(repo: Path, variant: str = "auto") -> ServerConfig:
    return ServerConfig(model_repository=repo, variant=variant)


def test_a_variant_that_disagrees_with_float32_is_never_served(tmp_path: Path) -> None:
    version = make_version(tmp_path / "m" / "1", corrupt=True)
    choice = choose_variant(version, _config(tmp_path))
    assert choice.variant == "float32" and choice.path == version / "model.onnx"
    assert "over the 0.5-point budget" in choice.reason and "int8" in choice.reason
    assert choice.source == "measured" and "avx" in choice.host.lower() + " avx"
    with pytest.raises(NotAllowed, match=r"--variant int8 refused .*lost \d+\.\d+ points"):
        choose_variant(version, _config(tmp_path, "int8"))


def test_a_variant_that_passes_serves_when_asked_and_float32_when_asked(tmp_path: Path) -> None:
    version = make_version(tmp_path / "m" / "1")
    asked = choose_variant(version, _config(tmp_path, "int8"))
    assert asked.variant == "int8" and asked.source == "explicit"
    assert "within the 0.5-point budget" in asked.reason
    assert choose_variant(version, _config(tmp_path, "float32")).variant == "float32"
    # auto also needs int8 to measure faster here; a 16 px toy model may not, and then
    # the reason says so (the figures, not an assumption).
    auto = choose_variant(version, _config(tmp_path))
    assert auto.variant in ("int8", "float32") and "float32 images/s here" in auto.reason


def test_a_float32_only_version_serves_unchanged_and_int8_is_refused(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    build_conv_classifier(version / "model.onnx")  # the older layout: one file
    choice = choose_variant(version, _config(tmp_path))
    assert (choice.variant, choice.source) == ("float32", "only")
    assert "no int8/int8-rr variant" in choice.reason
    with pytest.raises(NotAllowed, match="no int8 variant"):
        choose_variant(version, _config(tmp_path, "int8"))
    without_reference = make_version(tmp_path / "n" / "1", reference=False)
    assert "no reference.npz" in choose_variant(without_reference, _config(tmp_path)).reason


def test_an_older_int8_model_file_is_served_as_published(tmp_path: Path) -> None:
    made = make_version(tmp_path / "made" / "1")
    old = tmp_path / "m" / "1" / "model.onnx"
    old.parent.mkdir(parents=True)
    int8 = onnx.load(str(made / "model.int8.onnx"))
    for prop in int8.metadata_props:  # what an older tlserve wrote into its int8 file
        if prop.key == "tlserve.notes":
            prop.value = '{"seed": "0", "variant": "int8"}'
    onnx.save(int8, str(old))
    choice = choose_variant(old.parent, _config(tmp_path))
    assert (choice.variant, choice.source) == ("int8", "only")
    assert "unchecked on this host" in choice.reason
    with pytest.raises(NotAllowed, match=r"--variant float32 refused .* no other file"):
        choose_variant(old.parent, _config(tmp_path, "float32"))  # it is not float32


def test_the_server_serves_float32_for_a_failing_int8_and_says_why(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    make_version(repo / "colours" / "1", corrupt=True)
    images = colour_images(9, seed=4)
    running = ServerThread(repo)
    try:
        with Client(running.target) as client:
            outputs = client.infer("colours", {"images": images.images})
        assert (outputs["probabilities"].argmax(1) == images.labels).all()
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="colours"), timeout=5).config
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["variant"] == "float32" and params["variant_source"] == "measured"
        assert "over the 0.5-point budget" in params["variant_reason"]
        assert params["host_cpu"]
        with urllib.request.urlopen(running.metrics_url, timeout=5) as page:
            text = page.read().decode()
        assert (
            'tlserve_model_variant{model="colours",source="measured",variant="float32",'
            'version="1"} 1.0' in text
        )
    finally:
        running.stop()


def test_asking_for_a_failing_int8_keeps_the_version_from_loading(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    make_version(repo / "colours" / "1", corrupt=True)
    running = ServerThread(repo, variant="int8")
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
            ready = stub.ModelReady(pb.ModelReadyRequest(name="colours"), timeout=5)
        assert not ready.ready
        reasons = " ".join(entry.reason for entry in index.models)
        assert "--variant int8 refused" in reasons and "over the 0.5-point budget" in reasons
    finally:
        running.stop()


def test_a_reference_set_round_trips_and_a_bad_file_is_named(tmp_path: Path) -> None:
    model = build_conv_classifier(tmp_path / "model.onnx")
    reference = reference_for(model, n=12)
    path = tmp_path / "reference.npz"
    path.write_bytes(reference.to_bytes())
    loaded = ReferenceSet.load(path)
    np.testing.assert_array_equal(loaded.images, reference.images)
    assert loaded.held_out == 12 and loaded.probabilities.dtype == np.float32
    path.write_bytes(b"not a zip")
    with pytest.raises(Exception, match=r"reference\.npz is not a tlserve reference set"):
        ReferenceSet.load(path)


def test_inspect_says_which_variant_this_host_would_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlserve.cli.main import main

    version = make_version(tmp_path / "m" / "1", corrupt=True)
    assert main(["inspect", str(version), "--check"]) == 0
    out = capsys.readouterr().out
    assert "variants   float32, int8 (+ reference.npz)" in out
    assert "this host  " in out and "serves float32 [measured]" in out
    assert "over the 0.5-point budget" in out


def test_a_broken_reference_set_or_variant_file_falls_back_to_float32(tmp_path: Path) -> None:
    version = make_version(tmp_path / "m" / "1")
    (version / "reference.npz").write_bytes(b"truncated")
    choice = choose_variant(version, _config(tmp_path))
    assert choice.variant == "float32" and "not a tlserve reference set" in choice.reason
    with pytest.raises(NotAllowed, match="--variant int8 refused"):
        choose_variant(version, _config(tmp_path, "int8"))
    other = make_version(tmp_path / "n" / "1")
    (other / "model.int8.onnx").write_bytes(b"not onnx")
    choice = choose_variant(other, _config(tmp_path))
    assert choice.variant == "float32" and "int8 did not run here" in choice.reason
