"""Imports flow one way: deployments -> flows -> tasks -> selpo_core; selpo_core never imports prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["selpo_core", "tasks", "flows", "deployments"]  # each may import only layers to its left


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def layer_violations(root: Path) -> list[str]:
    problems = []
    for position, layer in enumerate(LAYERS):
        forbidden = set(LAYERS[position + 1:])
        if layer == "selpo_core":
            forbidden.add("prefect")
        for path in sorted((root / layer).rglob("*.py")):
            for name in sorted(imported_modules(path) & forbidden):
                problems.append(f"{path.relative_to(root)} imports {name}")
    return problems


def test_layers_import_one_way() -> None:
    assert layer_violations(ROOT) == []


def test_layer_check_catches_a_violation(tmp_path: Path) -> None:
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "selpo_core" / "bad.py").write_text("import prefect\nfrom flows import x\n")
    (tmp_path / "tasks" / "bad.py").write_text("from deployments.cli import main\n")
    assert layer_violations(tmp_path) == [
        "selpo_core/bad.py imports flows",
        "selpo_core/bad.py imports prefect",
        "tasks/bad.py imports deployments",
    ]


def module_imports(root: Path) -> dict[str, set[str]]:
    """{module: project modules it imports} over the four layers, function-level imports included (a lazy
    import still ties the two files together). `from pkg import name` counts as pkg.name when that is a module."""
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for layer in LAYERS for p in (root / layer).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets.update(subs or {node.module})
        graph[module] = targets - {module}
    return graph


def import_cycles(root: Path) -> list[list[str]]:
    """Every cycle of the module import graph, as the sorted modules of each strongly connected component."""
    graph = module_imports(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return sorted(cycles)


def test_no_import_cycles() -> None:
    assert import_cycles(ROOT) == []


def test_cycle_check_catches_a_cycle(tmp_path: Path) -> None:
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "selpo_core" / "__init__.py").write_text("")
    (tmp_path / "selpo_core" / "a.py").write_text("from selpo_core.b import x\n")
    (tmp_path / "selpo_core" / "b.py").write_text("def f():\n    from selpo_core import a\n")
    (tmp_path / "selpo_core" / "c.py").write_text("import selpo_core.a\n")
    assert import_cycles(tmp_path) == [["selpo_core.a", "selpo_core.b"]]


@pytest.mark.parametrize("layer", ["selpo_core"])
def test_core_imports_without_prefect(layer: str) -> None:
    import subprocess
    import sys

    code = (f"import sys, importlib, pkgutil, {layer}\n"
            f"for m in pkgutil.iter_modules({layer}.__path__): importlib.import_module('{layer}.' + m.name)\n"
            "assert 'prefect' not in sys.modules, 'prefect was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
