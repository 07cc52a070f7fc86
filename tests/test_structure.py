"""The shape of the tree: no import cycle between the job's modules (imports inside functions and under
TYPE_CHECKING count too), and no production module reaching for the test and benchmark fixtures."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imported(path: Path) -> set[str]:
    """Every top-level name an import in the file reaches, wherever the import statement is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def graph() -> dict[str, set[str]]:
    return {name: {n.split(".")[0] for n in imported(path)} & set(MODULES) - {name}
            for name, path in MODULES.items()}


def test_no_import_cycle_between_the_jobs_modules():
    deps = graph()
    assert {"base", "export", "verification", "libraries", "progress"} <= set(deps)
    assert "base" not in deps["export"] and "base" not in deps["verification"]
    try:
        order = list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert order.index("export") < order.index("base") < order.index("providers")


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from base import X\n"
                      "def f():\n    from export import y\n    import verification.sub\n")
    assert {"base", "export", "verification.sub"} <= imported(module)
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())


def test_production_code_never_imports_the_fixtures():
    users = sorted(name for name, path in MODULES.items() if any(n.startswith("scripts") for n in imported(path)))
    assert users == []
    assert not hasattr(__import__("lifecycle"), "local_job")
