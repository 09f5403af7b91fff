"""The commands in docs/ are real: each `tlserve ...` parses, the health and models
commands run against a real server, each `kubectl kustomize/apply` path exists and
renders, and every metric named exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.deploy.test_manifests import METRICS, _metric_names, needs_kubectl, render
from tests.support import ServerThread
from tlserve.cli.main import _parser, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def shell_commands() -> list[list[str]]:
    """Every command line of the ```sh blocks of docs/, continuations joined."""
    commands = []
    for page in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" > ")[0], comments=True)
                if words:
                    commands.append(words)
    return commands


COMMANDS = shell_commands()
TLSERVE = [c[1:] for c in COMMANDS if c[0] == "tlserve"]


def test_docs_exist_and_show_each_command() -> None:
    assert {p.name for p in DOCS} >= {"calling.md", "kubernetes.md", "metrics.md"}
    shown = {c[0] for c in TLSERVE}
    assert shown >= {"train", "serve", "classify", "models", "health"}


@pytest.mark.parametrize("argv", TLSERVE, ids=" ".join)
def test_each_tlserve_command_parses(argv: list[str]) -> None:
    _parser().parse_args(argv)


@pytest.mark.parametrize("argv", [c for c in TLSERVE if c[0] in ("health", "models")], ids=" ".join)
def test_health_and_models_commands_run_against_a_server(
    argv: list[str], server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLSERVE_TARGET", server.target)  # what `export TLSERVE_TARGET=` does
    argv = [server.target if a == "127.0.0.1:8001" else a for a in argv]
    assert main(argv) == 0


@needs_kubectl
def test_each_kubectl_path_exists_and_kustomize_renders() -> None:
    kubectl = [c for c in COMMANDS if c[0] == "kubectl"]
    rendered = [c[2] for c in kubectl if c[1] == "kustomize"]
    assert set(rendered) == {"deploy/base", "deploy/overlays/gpu", "deploy/monitoring"}
    for folder in rendered:
        assert render(folder)
    for command in kubectl:
        for flag in ("-k", "-f"):
            if flag in command:
                assert (ROOT / command[command.index(flag) + 1]).exists(), command


def test_every_metric_in_the_docs_exists() -> None:
    named = _metric_names(" ".join(p.read_text() for p in DOCS))
    assert named and named <= METRICS, named - METRICS
