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


@pytest.mark.parametrize("layer", ["selpo_core"])
def test_core_imports_without_prefect(layer: str) -> None:
    import subprocess
    import sys

    code = (f"import sys, importlib, pkgutil, {layer}\n"
            f"for m in pkgutil.iter_modules({layer}.__path__): importlib.import_module('{layer}.' + m.name)\n"
            "assert 'prefect' not in sys.modules, 'prefect was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
