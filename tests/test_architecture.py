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


def _module_name(path: Path) -> str:
    parts = ("tlserve", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Each tlserve module -> the tlserve modules it imports.

    Every import statement counts, at module level, in a function or under
    ``TYPE_CHECKING``: hiding one only moves the loop to run time or to the
    type checker. ``from a.b import c`` reads ``a.b`` (and ``a.b.c`` when that
    is a module); importing ``a.b.c`` runs ``a.b``'s ``__init__`` too, unless
    the importer is inside ``a.b`` already.
    """
    paths = {_module_name(p): p for package in (*PACKAGES, "protos") for p in _modules(package)}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        own = {module.rsplit(".", n)[0] for n in range(module.count(".") + 1)}
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                    package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{package}.{base}".rstrip(".")
                named.add(base)
                named.update(f"{base}.{alias.name}" for alias in node.names)
        ancestors = {n.rsplit(".", k)[0] for n in named for k in range(1, n.count(".") + 1)}
        graph[module] = {t for t in named | (ancestors - own) if t in paths and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """One ``a -> b -> a`` line for each import that closes a loop (depth first)."""
    found: list[str] = []
    path: list[str] = []
    state: dict[str, str] = {}

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_no_import_cycle_among_tlserve_modules() -> None:
    graph = _import_graph()
    # The graph sees what a module-level reading would miss: the CLI imports
    # training inside a function, and a package's __init__ runs for its modules.
    assert "tlserve.training" in graph["tlserve.cli.main"]
    assert "tlserve.training.fit.strategies" in graph["tlserve.training.check.ood"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    cycles = _cycles(graph)
    assert not cycles, "import cycles (move what both sides need into a module of its own):\n" + (
        "\n".join(cycles)
    )


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


# Each package's layers, bottom first: a module imports only its own layer and
# the layers below it, so the folders read as the layers they are. A layer is a
# sub-package (its folder's name) or a set of named modules.
LAYERS: dict[str, list[str | frozenset[str]]] = {
    # Training's stages in pipeline order, then above them the package's API,
    # one run's settings and the pipelines (a training run; quantizing a
    # published version, which reads its run record).
    "training": [
        "data", "backbone", "features", "fit", "check", "artifact", "report",
        frozenset({"tlserve.training", "tlserve.training.config", "tlserve.training.train",
                   "tlserve.training.quantize_published"}),
    ],
    # The server's base (the modules at server/'s top level, which every layer
    # may use), then batching, the loaded models, the planes without gRPC, the edge.
    "server": [
        frozenset({"tlserve.server", "tlserve.server.config", "tlserve.server.metrics",
                   "tlserve.server.policy"}),
        "batching", "models", "core", "edge",
    ],
}  # fmt: skip


def _layer(package: str, module: str) -> int | None:
    """The index of ``module``'s layer in ``LAYERS[package]``; None outside every layer."""
    parts = module.split(".")
    for index, layer in enumerate(LAYERS[package]):
        if isinstance(layer, frozenset):
            if module in layer:
                return index
        elif parts[:3] == ["tlserve", package, layer]:
            return index
    return None


def _name(package: str, index: int) -> str:
    layer = LAYERS[package][index]
    return layer if isinstance(layer, str) else "top" if index else "base"


def _upward_imports(package: str, graph: dict[str, set[str]]) -> list[str]:
    """One line for each import of a higher layer of ``package`` by a lower one."""
    found = []
    for module, targets in sorted(graph.items()):
        own = _layer(package, module)
        for target in sorted(targets):
            theirs = _layer(package, target)
            if own is not None and theirs is not None and theirs > own:
                found.append(
                    f"{module} ({_name(package, own)}) imports {target} ({_name(package, theirs)})"
                )
    return found


def test_an_upward_import_is_found_in_either_package() -> None:
    toy = {
        "tlserve.training.data.a": {"tlserve.training.fit.b", "tlserve.training.config"},
        "tlserve.server.batching.c": {"tlserve.server.models.d", "tlserve.server.config"},
        "tlserve.server.config": {"tlserve.server.edge.e"},
    }
    assert _upward_imports("training", toy) == [
        "tlserve.training.data.a (data) imports tlserve.training.config (top)",
        "tlserve.training.data.a (data) imports tlserve.training.fit.b (fit)",
    ]
    assert _upward_imports("server", toy) == [
        "tlserve.server.batching.c (batching) imports tlserve.server.models.d (models)",
        "tlserve.server.config (base) imports tlserve.server.edge.e (edge)",
    ]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layers_import_only_downward(package: str) -> None:
    graph = _import_graph()
    modules = [m for m in graph if f"{m}.".startswith(f"tlserve.{package}.")]
    folders = {layer for layer in LAYERS[package] if isinstance(layer, str)}
    assert {f"tlserve.{package}.{folder}" for folder in folders} <= set(modules)
    loose = sorted(m for m in modules if _layer(package, m) is None)
    assert not loose, f"{package} modules in no layer (move each into one):\n" + "\n".join(loose)
    upward = _upward_imports(package, graph)
    order = " < ".join(_name(package, i) for i in range(len(LAYERS[package])))
    assert not upward, (
        f"a {package} layer imports a higher one (order: {order}; move the module, or "
        "what it needs, down):\n" + "\n".join(upward)
    )
