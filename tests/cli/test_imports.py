"""The command line sits on top: it imports the doctor and the run files, and neither imports it back.

The graph is read from the source (every ``import`` of every module, those inside functions included,
those under ``if TYPE_CHECKING:`` left out, since they never run), and importing ``a.b.c`` runs
``a/__init__`` and ``a/b/__init__`` first, so each module also depends on its packages.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

import pytest

import mfu_callbacks

PACKAGE = Path(mfu_callbacks.__file__).parent


@functools.cache
def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("mfu_callbacks", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that importing ``name`` runs: what it imports, and the packages above each."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        source = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
        targets.add(source)
        # `from pkg import name`: name is a submodule when one has that name
        targets.update(
            f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules
        )
    closed = set()
    for target in targets:
        parts = target.split(".")
        closed.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    closed.update(
        ".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)
    )  # its own packages
    return {target for target in closed if target in modules and target != name}


@functools.cache  # read once: every test below reads the same source
def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative): the sets of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def in_group(name: str, group: str) -> bool:
    return name == group or name.startswith(group + ".")


def test_the_cycle_finder_finds_a_cycle_through_a_package():
    graph = {"a": {"a.x"}, "a.x": {"a", "b.y"}, "b": set(), "b.y": {"b", "a"}}
    assert {"a", "a.x", "b.y"} in strongly_connected(graph)


def test_the_graph_holds_the_command_lines_imports():
    """The reader sees what the command line imports, inside functions too (a reader that saw nothing
    would pass every check below)."""
    graph = import_graph()
    assert "mfu_callbacks.doctor" in graph["mfu_callbacks.cli.doctor"]
    assert "mfu_callbacks.cli.doctor" in graph["mfu_callbacks.cli"]  # imported inside _parser
    assert "mfu_callbacks.cli" in graph["mfu_callbacks.cli.model"]  # its package runs first
    assert "mfu_callbacks.runs.compare" in graph["mfu_callbacks.cli.compare"]


@pytest.mark.parametrize("group", ["mfu_callbacks.doctor", "mfu_callbacks.runs"])
def test_the_doctor_and_the_run_files_never_import_the_command_line(group):
    graph = import_graph()
    back = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if in_group(name, group)
        for target in targets
        if in_group(target, "mfu_callbacks.cli")
    )
    assert not back, back


def test_no_import_cycle_joins_the_command_line_and_the_doctor():
    for component in strongly_connected(import_graph()):
        groups = {
            group
            for group in ("mfu_callbacks.cli", "mfu_callbacks.doctor")
            for name in component
            if in_group(name, group)
        }
        assert len(groups) < 2, sorted(component)


@pytest.mark.parametrize(
    "name",
    [
        name
        for name in module_names()
        if any(
            in_group(name, group)
            for group in ("mfu_callbacks.cli", "mfu_callbacks.doctor", "mfu_callbacks.runs")
        )
        and not name.endswith("__main__")
    ],
)
def test_every_module_of_the_command_line_doctor_and_run_files_imports(name):
    assert importlib.import_module(name).__name__ == name
