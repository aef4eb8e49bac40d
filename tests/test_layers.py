"""The import rules of docs/architecture.md, read from the source with ``ast`` (every import statement counts:
module-level, function-level and ``TYPE_CHECKING`` ones).

* layers, bottom to top: errors; methods and onnx_file; graph_passes, runtimes and reference; converters and
  calibration; the artifact store; the verbs (exporter, parity, bench, inspect, plan, quantize, gate); deploy; the
  facade (``api``, the package root) and the CLI. A module imports only from its own layer or below;
* methods import nothing outside the standard library but ``tokensieve.errors`` and other methods;
* graph_passes and runtimes never import torch (or torch-based libraries), ``tokensieve.reference`` or
  ``tokensieve.converters``: a deployment box may have only ONNX Runtime;
* nothing inside the package imports the CLI or the facade (``__main__`` runs the CLI; the CLI and the package
  root use the facade);
* no import cycles.
"""

from __future__ import annotations

import ast
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokensieve"
LAYERS = [
    {"errors"},
    {"methods", "onnx_file", "manifest"},
    {"graph_passes", "runtimes", "reference"},
    {"converters", "calibration"},
    {"artifact"},
    {"exporter", "parity", "bench", "inspect", "plan", "quantize", "gate", "evaluate"},
    {"deploy"},
    {"api", "cli", "__main__", ""},
]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}
TORCH_BASED = {"torch", "torchvision", "timm", "transformers", "optimum"}
IMPORTERS = {"cli": {"__main__"}, "api": {"", "cli"}}  # the only groups that may import the CLI and the facade


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports (absolute dotted names, relative imports resolved) and the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            # `from package import module` imports the module (a parent package's __init__ runs for every submodule
            # import and is not counted); `from module import name` imports the module
            yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)
            yield f"{base}.*", node.lineno


def graph(root: Path) -> dict[str, dict[str, int]]:
    """Module -> {imported module of the package: line}, plus third-party roots under the key ``"<external>"``."""
    names = modules(root)
    edges: dict[str, dict[str, int]] = {}
    for name, path in names.items():
        targets: dict[str, int] = {}
        entries = list(imports(name, path))
        named = {target for target, _ in entries}
        for target, line in entries:
            if target.split(".")[0] != root.name:
                targets.setdefault(f"<external>{target.split('.')[0]}", line)
                continue
            if target.endswith(".*"):  # the `from X import ...` statement itself: X, unless it only named modules
                base = target[:-2]
                if any(t.startswith(f"{base}.") and t in names for t in named) or base not in names:
                    continue
                target = base
            while target not in names and "." in target:
                target = target.rpartition(".")[0]
            if target != name and target in names:
                targets.setdefault(target, line)
        edges[name] = targets
    return edges


def group(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, {}):
            if target.startswith("<external>"):
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for node in edges:
        if node not in index:
            visit(node)
    return found


def violations(root: Path) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    edges = graph(root)
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    for name, targets in edges.items():
        source = group(name)
        for target, line in targets.items():
            where = f"{name}:{line} imports {target.removeprefix('<external>')}"
            if target.startswith("<external>"):
                library = target.removeprefix("<external>")
                if source == "methods" and library not in sys.stdlib_module_names:
                    found.append(f"{where}: methods import nothing heavy")
                if source in ("graph_passes", "runtimes") and library in TORCH_BASED:
                    found.append(f"{where}: graph passes and runtimes never import torch")
                continue
            aim = group(target)
            if source in ("graph_passes", "runtimes") and aim in ("reference", "converters"):
                found.append(f"{where}: graph passes and runtimes never import the reference or converters")
            elif aim in IMPORTERS and source != aim and source not in IMPORTERS[aim]:
                found.append(f"{where}: nothing inside the package imports the CLI or the facade")
            elif RANK.get(aim, -1) > RANK.get(source, -1):
                found.append(f"{where}: layer {source or 'root'} is below layer {aim}")
    return found


def test_package_holds_the_import_rules():
    unknown = sorted({group(name) for name in modules(PACKAGE)} - set(RANK))
    assert not unknown, f"give these packages a layer in tests/test_layers.py and docs/architecture.md: {unknown}"
    assert violations(PACKAGE) == []


def _inject(root: Path, module: str, line: str) -> None:
    path = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
    path.write_text(path.read_text() + f"\n\ndef _injected():\n    {line}\n")


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        # a function-level import of the facade from the storage module: a cycle and a layer break
        ("tokensieve.artifact.store", "from tokensieve.api import Artifact", "import cycle"),
        ("tokensieve.artifact.store", "from tokensieve.api import Artifact", "nothing inside the package imports"),
        ("tokensieve.parity.report", "from tokensieve.parity.image import check_parity", "import cycle"),
        ("tokensieve.methods.fastv", "import numpy", "methods import nothing heavy"),
        ("tokensieve.runtimes.ort", "import torch", "never import torch"),
        ("tokensieve.graph_passes.lint", "from tokensieve.reference import reduce", "never import the reference"),
        ("tokensieve.runtimes.kv_cache", "from tokensieve.artifact import store", "is below layer artifact"),
    ],
)
def test_rules_fail_on_a_broken_copy(tmp_path, module, line, expected):
    """The test of the test: the same check on a copy of the package with one forbidden import added."""
    copy = tmp_path / "tokensieve"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(copy) == []
    _inject(copy, module, line)
    assert any(expected in v for v in violations(copy)), violations(copy)


def test_no_function_over_80_lines():
    """Short functions: none outside the tests over 80 lines (docstring included)."""
    files = [p for folder in ("tokensieve", "benchmarks", "examples") for p in (PACKAGE.parent / folder).rglob("*.py")]
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(files)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
