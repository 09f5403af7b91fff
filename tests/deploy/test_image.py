"""The serve-cpu image, built from the Dockerfile and run the way production runs it.

podman builds the Dockerfile's `serve-cpu` target on a stand-in for its
PYTHON_IMAGE (deploy/podman/build_base.sh: no image registry is reachable
here). The container then runs with the image's own user, a read-only root
filesystem and a read-only model repository, as deploy/base runs the pod; the
host's `tlserve` CLI checks health, classifies a real PNG and reads /metrics;
and `podman stop` must drain (NOT_SERVING while still answering) and exit 0.

`make image-test` installs podman first; here, without it, the tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import build_tiny_classifier, png_bytes

# From nothing: the base (debootstrap, 1-4 min) and the build (about 1 min) in
# the first test's setup; pytest's 300 s default is too short for that.
pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BUILD_BASE = ROOT / "deploy" / "podman" / "build_base.sh"
BASE_IMAGE = os.environ.get("TLSERVE_BASE_IMAGE", "localhost/tlserve-python-base:bookworm")
IMAGE = "localhost/tlserve:serve-cpu-test"
BUILT_HERE = "tlserve.image-test=1"  # a label on every layer this test builds
TLSERVE = str(Path(sys.executable).parent / "tlserve")
# runc, not crun, and explicit ulimits: podman's defaults fail in sandboxes
# like CI's, and these work wherever podman does. Host networking, because
# rootful podman's bridge needs iptables; the ports are then the host's.
PODMAN = ("podman", "--runtime", "runc")
SANDBOX = ("--network", "host", "--ulimit", "nofile=1024:20000", "--ulimit", "nproc=4096:4096")
DRAIN_DELAY = 5.0  # the image's TLSERVE_DRAIN_DELAY (tests/deploy/test_dockerfile.py)


def _podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _tlserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TLSERVE, *args], capture_output=True, text=True, timeout=30)


def _report(config: pytest.Config, line: str) -> None:
    """Figures worth seeing in the run's output, not only in a failure."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and terminal is not None:
        with capture.global_and_fixture_disabled():
            terminal.ensure_newline()
            terminal.write_line(f"image-test: {line}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: `make image-test` installs it (apt, as root)")
    if _podman("image", "exists", BASE_IMAGE).returncode != 0 and (
        os.geteuid() != 0 or shutil.which("debootstrap") is None
    ):
        pytest.skip(f"{BASE_IMAGE} is missing, and building it takes root and debootstrap")
    start = time.monotonic()
    base = subprocess.run(
        ["bash", str(BUILD_BASE)], capture_output=True, text=True, timeout=600, check=False
    )
    assert base.returncode == 0, base.stdout + base.stderr
    _report(request.config, f"{base.stdout.strip()} ({time.monotonic() - start:.0f} s)")

    start = time.monotonic()
    # --format docker keeps the HEALTHCHECK (OCI images have none), as Docker would.
    build = _podman(
        "build", *SANDBOX, "--format", "docker", "--target", "serve-cpu",
        "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--label", BUILT_HERE,
        "--tag", IMAGE, str(ROOT),
        timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, (build.stdout + build.stderr)[-5000:]
    took = time.monotonic() - start
    # Each change of the sources leaves the last build's layers behind; keep
    # the recent ones (an unchanged rerun is then cached), drop the rest.
    for label in (BUILT_HERE, "tlserve.base-recipe"):
        _podman("image", "prune", "--force", "--filter", f"label={label}", "--filter", "until=1h")
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    _report(request.config, f"built {IMAGE} in {took:.0f} s, {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Made on the host: the image has onnxruntime but not onnx (nor torch).
    repo = tmp_path_factory.mktemp("image") / "models"
    build_tiny_classifier(repo / "tiny" / "1" / "model.onnx")
    return repo


@dataclass(frozen=True)
class Container:
    name: str
    target: str
    metrics_url: str

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return _podman("exec", self.name, *command)

    def logs(self) -> str:
        result = _podman("logs", self.name)
        return (result.stdout + result.stderr)[-5000:]

    def running(self) -> bool:
        state = _podman("inspect", "--format", "{{.State.Running}}", self.name)
        return state.stdout.strip() == "true"


@contextmanager
def _run_container(image: str, repo: Path) -> Iterator[Container]:
    grpc_port, metrics_port = _free_port(), _free_port()
    target = f"127.0.0.1:{grpc_port}"
    container = Container(
        name=f"tlserve-image-test-{uuid.uuid4().hex[:8]}",
        target=target,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    started = _podman(
        "run", "--detach", "--name", container.name, *SANDBOX,
        # What deploy/base's pod has: read-only root and models, a writable /tmp,
        # no capabilities, no privilege escalation; the image's own user.
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--volume", f"{repo}:/models:ro",
        # On the host's network: stay on loopback, on ports that are free.
        "--env", "TLSERVE_HOST=127.0.0.1",
        "--env", f"TLSERVE_GRPC_PORT={grpc_port}",
        "--env", f"TLSERVE_METRICS_PORT={metrics_port}",
        "--env", f"TLSERVE_HTTP_PORT={_free_port()}",  # not the image's 8000 on the host
        # The image's HEALTHCHECK runs `tlserve health`, which reads this.
        "--env", f"TLSERVE_TARGET={target}",
        image,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 120
        while _tlserve("health", "--target", target, "--timeout", "2").returncode != 0:
            assert container.running(), f"the container exited:\n{container.logs()}"
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{container.logs()}"
            time.sleep(0.5)
        yield container
    finally:
        _podman("rm", "--force", "--time", "0", container.name)


@pytest.fixture(scope="module")
def serving(image: str, model_repo: Path) -> Iterator[Container]:
    with _run_container(image, model_repo) as container:
        yield container


def test_health_answers_serving(serving: Container) -> None:
    health = _tlserve("health", "--json", "--target", serving.target)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"target": serving.target, "health": "SERVING",
                                         "ready": True}  # fmt: skip
    # The image's own HEALTHCHECK, run inside the container as Docker runs it.
    check = _podman("healthcheck", "run", serving.name)
    assert check.returncode == 0, check.stdout + check.stderr


def test_classify_answers_labels_for_a_real_png(serving: Container, tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(png_bytes((230, 20, 10)))
    (tmp_path / "blue.png").write_bytes(png_bytes((10, 20, 230)))
    result = _tlserve("classify", "--json", "--target", serving.target, "--model", "tiny",
                      "--top-k", "1", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    best = {
        Path(row["file"]).name: row["labels"][0]["label"]
        for row in map(json.loads, result.stdout.splitlines())
    }
    assert best == {"red.png": "red", "blue.png": "blue"}


def test_metrics_count_the_requests(serving: Container) -> None:
    with urllib.request.urlopen(serving.metrics_url, timeout=10) as response:
        page = response.read().decode()
    loaded = [line for line in page.splitlines() if line.startswith("tlserve_model_loaded{")]
    assert len(loaded) == 1 and loaded[0].endswith(" 1.0"), loaded
    for label in ('model="tiny"', 'version="1"', 'provider="CPUExecutionProvider"'):
        assert label in loaded[0]
    assert "# TYPE tlserve_requests_total counter" in page


def test_runs_as_uid_10001_with_read_only_models(serving: Container) -> None:
    status = serving.exec("cat", "/proc/1/status")
    assert status.returncode == 0, status.stderr
    uids = next(line.split()[1:] for line in status.stdout.splitlines() if line.startswith("Uid:"))
    assert uids == ["10001"] * 4  # real, effective, saved, filesystem
    command = serving.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    assert Path(command[1]).name == "tlserve" and command[2] == "serve", command
    for path in ("/models/tiny/written-by-the-server", "/written-by-the-server"):
        write = serving.exec("touch", path)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, path


def test_stop_drains_then_exits_0(
    image: str, model_repo: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    (tmp_path / "red.png").write_bytes(png_bytes((230, 20, 10)))
    with _run_container(image, model_repo) as container:
        start = time.monotonic()
        # The grace period Kubernetes gives (deploy/base: 40 s); past it, SIGKILL (137).
        stop = subprocess.Popen(
            [*PODMAN, "stop", "--time", "40", container.name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            # Draining: health flips to not ready while calls are still answered.
            health = _tlserve("health", "--target", container.target, "--timeout", "1")
            while health.returncode == 0:
                assert time.monotonic() < start + DRAIN_DELAY, "still SERVING after SIGTERM"
                time.sleep(0.1)
                health = _tlserve("health", "--target", container.target, "--timeout", "1")
            assert "NOT_SERVING" in health.stdout + health.stderr, health
            during = _tlserve("classify", "--target", container.target, "--model", "tiny",
                              "--timeout", "2", str(tmp_path / "red.png"))  # fmt: skip
            assert time.monotonic() < start + DRAIN_DELAY, "the drain ended before classify ran"
            assert during.returncode == 0 and "red" in during.stdout, during.stderr
            _, errors = stop.communicate(timeout=60)
        finally:
            stop.kill()
            stop.wait()
        elapsed = time.monotonic() - start
        assert stop.returncode == 0, errors
        code = _podman("inspect", "--format", "{{.State.ExitCode}}", container.name)
        logs = container.logs()
        assert code.stdout.strip() == "0", logs
        assert "draining: health NOT_SERVING" in logs and "stopped" in logs, logs
        assert DRAIN_DELAY <= elapsed < 40, elapsed
        _report(request.config, f"podman stop: drained and exited 0 in {elapsed:.1f} s")
