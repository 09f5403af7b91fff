"""The import rule and size limit of docs/architecture.md, checked.

Static checks read every handwritten module's imports with ``ast``; one
runtime check imports the contract in a fresh interpreter and looks at what
came with it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "client", "server", "training", "cli")
MAX_LINES = 300

# package -> the tlserve packages it may import
ALLOWED = {
    "contract": {"contract", "protos"},
    "client": {"contract", "protos", "client"},
    "server": {"contract", "protos", "server"},
    "training": {"contract", "protos", "training"},
    "cli": {"contract", "protos", "client", "server", "training", "cli"},
}
# Third-party modules the contract must never import: it is the lightest package.
CONTRACT_FORBIDDEN = ("onnxruntime", "onnx", "torch", "grpc_health", "grpc_reflection")


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if not p.name.endswith("_pb2.py"))


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_the_rule_allows(package: str) -> None:
    broken = []
    for path in _modules(package):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "tlserve" and len(parts) > 1 and parts[1] not in ALLOWED[package]:
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not broken, "\n".join(broken)


def test_contract_imports_no_server_runtime_or_torch() -> None:
    broken = []
    for path in _modules("contract"):
        for name in _imports(path):
            if name.split(".")[0] in CONTRACT_FORBIDDEN or name.startswith("grpc.aio"):
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            # grpc.StatusCode is the contract's; grpc.server / grpc.aio are a server's.
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "grpc"
                and node.attr in ("aio", "server")
            ):
                broken.append(f"{path.relative_to(ROOT)} uses grpc.{node.attr}")
    assert not broken, "\n".join(broken)


def test_importing_the_contract_pulls_in_no_heavy_package() -> None:
    code = (
        "import sys\n"
        "import tlserve.contract.card, tlserve.contract.codec, tlserve.contract.errors\n"
        "import tlserve.contract.images, tlserve.contract.predictions, tlserve.contract.rules\n"
        "heavy = ('onnxruntime', 'onnx', 'torch', 'tlserve.client', 'tlserve.server',\n"
        "         'tlserve.training')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


def test_no_handwritten_module_is_longer_than_a_sitting() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for package in (*PACKAGES, "bench")
        for path in (_modules(package) if (ROOT / package).is_dir() else [])
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)
