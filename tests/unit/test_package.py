"""The package as a whole: its imports point one way (cli -> report -> gate / stores -> tasks, methods, backends,
perf -> models, data, qlinear -> config), and no class or function outgrows what a reader holds in mind."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.repo import REPO_ROOT

PACKAGE = REPO_ROOT / "quant"

# Each module's tier, lowest first: a module imports only from its own tier or below. Within a tier, the modules
# must still not import each other in a cycle.
TIERS = (
    {"config", "project", "scaffold", "quiet", "metrics", "figures", "replicas"},
    {"cache", "models", "data", "calibration", "qlinear", "memory"},
    {"tasks", "kinds", "stats", "methods", "backends", "perf", "compiled", "kernels"},
    {"matrix", "gate", "informative", "stores", "snapshots", "decide", "history"},
    {"pipeline", "plan", "noise", "sensitivity", "crosscheck"},
    {"report", "pytest_plugin"},
    {"cli", "commands", "__main__", "__init__"},
)
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 150, 60


def _top_module(path: Path, package: Path) -> str:
    """``quant/kinds/choice.py`` -> ``kinds``; ``quant/cli.py`` -> ``cli``."""
    return path.relative_to(package).with_suffix("").parts[0]


def _imported_modules(tree: ast.Module) -> set[str]:
    """The quant modules a file imports, at run time (imports for type checkers only are left out: they make
    no dependency when the code runs)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quant":
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("quant."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each top-level module of the package (a sub-package counts as one) -> the other ones it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        module = _top_module(path, package)
        graph.setdefault(module, set()).update(_imported_modules(ast.parse(path.read_text())) - {module})
    return graph


def _tier(module: str) -> int:
    tiers = [index for index, tier in enumerate(TIERS) if module in tier]
    if not tiers:
        pytest.fail(f"quant/{module}: not placed in tests/unit/test_package.py TIERS; add it to the tier of what it does")
    return tiers[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as the modules along it, or None."""
    state: dict[str, str] = {}

    def walk(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]  # an open module is on the current path
            if imported not in state and (found := walk(imported, path + [imported])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := walk(module, [module])):
            return found
    return None


def test_imports_point_one_way():
    graph = import_graph()
    upward = [f"{module} (tier {_tier(module)}) imports {imported} (tier {_tier(imported)})"
              for module, imported_modules in sorted(graph.items()) for imported in sorted(imported_modules)
              if _tier(imported) > _tier(module)]
    assert not upward, upward
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    package = tmp_path / "quant"
    (package / "kinds").mkdir(parents=True)
    (package / "config.py").write_text("from quant import cli\n")
    (package / "cli.py").write_text("from quant.kinds import choice\n")
    (package / "kinds" / "choice.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quant import report\n"
        "def f():\n    import quant.config\n")
    graph = import_graph(package)
    assert graph == {"config": {"cli"}, "cli": {"kinds"}, "kinds": {"config"}}
    assert _tier("config") < _tier("cli")
    assert _cycle(graph) == ["cli", "kinds", "config", "cli"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _oversized(path: Path, root: Path = REPO_ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef)
                 else MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
        if limit and node.end_lineno - node.lineno + 1 > limit:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: "
                         f"{node.end_lineno - node.lineno + 1} lines (at most {limit})")
    return found


def test_no_class_or_function_outgrows_its_limit():
    oversized = [line for path in sorted(PACKAGE.rglob("*.py")) for line in _oversized(path)]
    assert not oversized, oversized


def test_the_size_check_sees_a_long_function_and_a_long_class(tmp_path):
    path = tmp_path / "long.py"
    path.write_text("def short():\n    pass\n"
                    + "def long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
                    + "class Long:\n" + "    x = 1\n" * MAX_CLASS_LINES)
    assert _oversized(path, tmp_path) == [
        f"long.py:3 long: {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})",
        f"long.py:{MAX_FUNCTION_LINES + 4} Long: {MAX_CLASS_LINES + 1} lines (at most {MAX_CLASS_LINES})"]
