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


# Training's stages (its sub-packages), in pipeline order: each imports only
# itself and the stages before it, so the folders read as the layers they are.
TRAINING_STAGES = ["data", "backbone", "features", "fit", "check", "artifact", "report"]
# Above every stage: the package's API, one run's settings, and the pipelines
# (a training run; quantizing a published version, which reads its run record).
TRAINING_TOP = {
    "tlserve.training",
    "tlserve.training.config",
    "tlserve.training.train",
    "tlserve.training.quantize_published",
}


def _training_stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] == ["tlserve", "training"] and len(parts) > 2 and parts[2] in TRAINING_STAGES:
        return TRAINING_STAGES.index(parts[2])
    return None


def _training_upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """One line for each import of a later stage, or of the top, by a stage module."""
    found = []
    for module, targets in sorted(graph.items()):
        own = _training_stage(module)
        if own is None:
            continue
        for target in sorted(t for t in targets if f"{t}.".startswith("tlserve.training.")):
            theirs = _training_stage(target)
            if theirs is None or theirs > own:
                name = "top" if theirs is None else TRAINING_STAGES[theirs]
                found.append(f"{module} ({TRAINING_STAGES[own]}) imports {target} ({name})")
    return found


def test_training_stages_import_only_downward() -> None:
    graph = _import_graph()
    training = [m for m in graph if f"{m}.".startswith("tlserve.training.")]
    assert {f"tlserve.training.{stage}" for stage in TRAINING_STAGES} <= set(training)
    loose = sorted(m for m in training if _training_stage(m) is None and m not in TRAINING_TOP)
    assert not loose, "training modules in no stage (move each into one):\n" + "\n".join(loose)
    toy = {"tlserve.training.data.a": {"tlserve.training.fit.b", "tlserve.training.config"}}
    assert _training_upward_imports(toy) == [
        "tlserve.training.data.a (data) imports tlserve.training.config (top)",
        "tlserve.training.data.a (data) imports tlserve.training.fit.b (fit)",
    ]
    upward = _training_upward_imports(graph)
    assert not upward, (
        f"a training stage imports a later one (order: {' < '.join(TRAINING_STAGES)}; "
        "move the module, or what it needs, down):\n" + "\n".join(upward)
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


# The server's layers, top to bottom: each imports only itself and the layers
# below it. The base is the modules at server/'s top level, which every layer
# may use; each other layer is the folder of its name.
SERVER_LAYERS = ["edge", "core", "models", "batching", "base"]
SERVER_BASE = {
    "tlserve.server",
    "tlserve.server.config",
    "tlserve.server.metrics",
    "tlserve.server.policy",
}


def _server_layer(module: str) -> str | None:
    if module in SERVER_BASE:
        return "base"
    parts = module.split(".")
    if parts[:2] == ["tlserve", "server"] and len(parts) > 2 and parts[2] in SERVER_LAYERS[:-1]:
        return parts[2]
    return None


def _server_upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """One line for each import of a higher server layer by a lower one."""
    found = []
    for module, targets in sorted(graph.items()):
        own = _server_layer(module)
        for target in sorted(targets):
            theirs = _server_layer(target)
            if own and theirs and SERVER_LAYERS.index(theirs) < SERVER_LAYERS.index(own):
                found.append(f"{module} ({own}) imports {target} ({theirs})")
    return found


def test_server_layers_import_only_downward() -> None:
    graph = _import_graph()
    server = [m for m in graph if f"{m}.".startswith("tlserve.server.")]
    assert {f"tlserve.server.{layer}" for layer in SERVER_LAYERS[:-1]} <= set(server)
    loose = sorted(m for m in server if _server_layer(m) is None)
    assert not loose, "server modules in no layer (move each into one):\n" + "\n".join(loose)
    toy = {
        "tlserve.server.batching.a": {"tlserve.server.models.b", "tlserve.server.config"},
        "tlserve.server.config": {"tlserve.server.edge.c"},
        "tlserve.server.edge.c": {"tlserve.server.core.d", "tlserve.server.edge.e"},
    }
    assert _server_upward_imports(toy) == [
        "tlserve.server.batching.a (batching) imports tlserve.server.models.b (models)",
        "tlserve.server.config (base) imports tlserve.server.edge.c (edge)",
    ]
    upward = _server_upward_imports(graph)
    assert not upward, (
        f"a server layer imports a higher one (order: {' > '.join(SERVER_LAYERS)}; "
        "move the module, or what it needs, down):\n" + "\n".join(upward)
    )
