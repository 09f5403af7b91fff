"""The ``tlserve`` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import ServerThread, png_bytes
from tlserve.client import Client

TLSERVE = [sys.executable, "-m", "tlserve.cli.main"]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TLSERVE_")}
    return subprocess.run(
        [*TLSERVE, *args], capture_output=True, text=True, timeout=120, env={**environ, **env}
    )


@pytest.fixture
def dead_target() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    (folder / "a-red.png").write_bytes(png_bytes((240, 5, 5)))
    (folder / "nested" / "b-blue.png").write_bytes(png_bytes((5, 5, 240)))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_classify_json_lines_walks_directories(server: ServerThread, images: Path) -> None:
    result = _run("classify", "--target", server.target, "--model", "tiny", "--top-k", "2",
                  "--json", str(images))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["a-red.png", "b-blue.png"]
    assert [r["labels"][0]["label"] for r in rows] == ["red", "blue"]
    assert set(rows[0]["labels"][0]) == {"label", "index", "score"}
    assert len(rows[0]["labels"]) == 2


def test_classify_table_and_exit_codes(server: ServerThread, images: Path) -> None:
    table = _run(
        "classify", "--target", server.target, "--model", "tiny", str(images / "a-red.png")
    )
    assert table.returncode == 0 and "a-red.png\tred" in table.stdout
    unknown = _run("classify", "--target", server.target, "--model", "ghost", str(images))
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and "ghost" in unknown.stderr
    usage = _run("classify", "--target", server.target, str(images))
    assert usage.returncode == 2 and "--model" in usage.stderr


def test_models_lists_versions_and_states(server: ServerThread) -> None:
    table = _run("models", "--target", server.target)
    assert table.returncode == 0, table.stderr
    assert table.stdout.split() == ["MODEL", "VERSION", "STATE", "REASON", "tiny", "1", "READY"]
    rows = _run("models", "--json", TLSERVE_TARGET=server.target)  # the target from the env
    assert rows.returncode == 0, rows.stderr
    assert [json.loads(line) for line in rows.stdout.splitlines()] == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""}
    ]


def test_health_exit_codes_scripts_can_use(server: ServerThread, dead_target: str) -> None:
    ready = _run("health", "--target", server.target)
    assert ready.returncode == 0 and "SERVING, ready" in ready.stdout
    as_json = _run("health", "--json", TLSERVE_TARGET=server.target)
    assert json.loads(as_json.stdout) == {"target": server.target, "health": "SERVING",
                                          "ready": True}  # fmt: skip
    down = _run("health", "--target", dead_target, "--timeout", "2")
    assert down.returncode == 3 and "UNAVAILABLE" in down.stderr


def test_a_wrong_token_exits_4(model_repo: Path, images: Path) -> None:
    secured = ServerThread(model_repo, auth_token="right")
    try:
        args = ("classify", "--target", secured.target, "--model", "tiny", str(images))
        assert _run(*args, TLSERVE_AUTH_TOKEN="wrong").returncode == 4
        assert _run(*args, TLSERVE_AUTH_TOKEN="right").returncode == 0
        # Health stays open without a token.
        assert _run("health", "--target", secured.target).returncode == 0
    finally:
        secured.stop()


def test_help_lists_the_commands_and_exit_codes() -> None:
    top = _run("--help")
    assert top.returncode == 0
    for word in ("classify", "models", "health", "serve", "train", "exit codes", "130"):
        assert word in top.stdout
    for command in ("classify", "models", "health"):
        helped = _run(command, "--help")
        assert helped.returncode == 0 and "TLSERVE_TARGET" in helped.stdout
        assert "3    try again later" in helped.stdout


def test_serve_without_repository_says_how_to_fix_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLSERVE_")}
    result = subprocess.run(
        [*TLSERVE, "serve"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2  # a missing setting is bad usage
    assert "--model-repository" in result.stderr


@pytest.fixture
def serve_process(model_repo: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [*TLSERVE, "serve", "--model-repository", str(model_repo), "--grpc-port", "0",
         "--metrics-port", "0", "--drain-delay", "1.5", "--grace", "2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    target = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not target:
        line = process.stderr.readline()
        match = re.search(r"gRPC on (\S+:\d+)", line)
        target = match.group(1) if match else ""
    assert target, "server never logged its port"
    yield process, target
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    process.stderr.close()


def test_sigterm_drains_then_stops_cleanly(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    process, target = serve_process
    with Client(target) as client, grpc.insecure_channel(target) as channel:
        client.wait_until_ready(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        process.send_signal(signal.SIGTERM)
        # Draining: health flips to NOT_SERVING but requests are still answered.
        deadline = time.monotonic() + 1.0
        status = health_pb2.HealthCheckResponse.SERVING
        while time.monotonic() < deadline and status == health_pb2.HealthCheckResponse.SERVING:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not client.server_ready(timeout=2)
        assert (
            client.classify(png_bytes((0, 250, 0)), model="tiny", timeout=2)[0][0].label == "green"
        )
    assert process.wait(timeout=15) == 0
    assert process.stderr is not None
    assert "stopped" in process.stderr.read()


def test_the_demo_finds_the_server_it_starts(model_repo: Path, tmp_path: Path) -> None:
    from tlserve.cli.demo import _free_port, _start_server

    http_port = _free_port()
    process, target, metrics_url = _start_server(model_repo, tmp_path / "server.log", http_port)
    try:
        with Client(target) as client:
            client.wait_until_ready(timeout=30)
        assert metrics_url.startswith("http://") and metrics_url.endswith("/metrics")
        ready = f"http://127.0.0.1:{http_port}/v2/health/ready"
        assert urllib.request.urlopen(ready, timeout=10).status == 200  # the page's port too
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
