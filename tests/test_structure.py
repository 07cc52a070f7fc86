"""The shape of the tree (issue 40): the files the job's users named at the top, every other module in a package
by its concern, and imports that run one way: no cycle between modules (imports inside functions and under
TYPE_CHECKING count too), each module importing only from its own layer or those below it, packages that
re-export nothing, and no production module reaching for the test and benchmark fixtures."""

from __future__ import annotations

import ast
import graphlib
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = ("main", "base", "providers", "job_manager", "storage", "schema")  # the users' names, at the top
PACKAGES = ("runtime", "models", "exporting", "training", "job", "operating")
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {
    f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"}
# Bottom to top: a module imports only from its own layer and those below (the most specific entry names a
# module's layer: runtime.errors is below the rest of its package, which reads the request's models).
LAYERS = (("runtime.errors",), ("schema", "storage", "job_manager"), ("runtime",), ("models",), ("exporting",),
          ("training",), ("base", "providers"), ("job",), ("main",), ("operating",))


def layer(module: str) -> int:
    for name in (module, module.split(".")[0]):
        for i, names in enumerate(LAYERS):
            if name in names:
                return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def imported(path: Path) -> set[str]:
    """Every module an import in the file reaches, wherever the import statement is: `from pkg import mod`
    reaches pkg.mod where that is a module of ours."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names
                      if f"{node.module}.{alias.name}" in MODULES}
    return names


def graph() -> dict[str, set[str]]:
    return {name: imported(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def test_the_named_files_stay_at_the_top_and_the_rest_sit_in_packages():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(TOP)
    assert all((ROOT / pkg / "__init__.py").is_file() for pkg in PACKAGES)
    assert len(MODULES) - len(TOP) >= 30  # the other modules, each in a package


def test_no_import_cycle_and_every_import_runs_down_the_layers():
    deps = graph()
    assert {"base", "exporting.export", "exporting.verification", "runtime.libraries"} <= set(deps)
    try:
        order = list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert order.index("exporting.export") < order.index("base") < order.index("providers")
    upward = sorted(f"{m} -> {d}" for m, ds in deps.items() for d in ds if layer(d) > layer(m))
    assert upward == []


def test_packages_re_export_nothing():
    """Each package's __init__ says what the package is for and imports nothing: a module is imported by its own
    name, never through another's."""
    for pkg in PACKAGES:
        tree = ast.parse((ROOT / pkg / "__init__.py").read_text())
        assert ast.get_docstring(tree), pkg
        assert [type(node).__name__ for node in tree.body] == ["Expr"], pkg


def test_the_checks_see_imports_inside_functions_and_upward_ones(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from base import X\n"
                      "def f():\n    from exporting import export\n    import training.vision\n")
    assert {"base", "exporting.export", "training.vision"} <= imported(module)
    assert layer("runtime.errors") < layer("schema") < layer("runtime.settings") < layer("exporting.cards")
    assert layer("operating.cli") > layer("main") > layer("job.lifecycle") > layer("providers")
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())


def test_production_code_never_imports_the_fixtures():
    users = sorted(name for name, path in MODULES.items() if any(n.startswith(("scripts", "tests", "benchmarks"))
                                                                 for n in imported(path)))
    assert users == []
    assert not hasattr(importlib.import_module("job.lifecycle"), "local_job")
