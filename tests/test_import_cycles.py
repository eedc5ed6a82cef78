"""No import circles inside ``metarl_robot``: the graph of its modules, read from the source, is acyclic.

Every ``import metarl_robot...`` and ``from metarl_robot... import`` counts, at module level or inside a
function (a lazy import still ties the two modules together). ``cli.py`` is left out: it imports every
command lazily and nothing imports it, so it cannot close a circle of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

from metarl_robot.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "metarl_robot"
EXEMPT = {"metarl_robot.cli"}
"""Modules left out of the graph (see the module docstring)."""


def module_name(path: Path) -> str:
    return ".".join(("metarl_robot", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module → the ``metarl_robot`` modules it imports (the most specific module each import names)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        if name in EXEMPT:
            continue
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package holding this module
                    parts = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*parts, *filter(None, [node.module])])
                # ``from pkg import sub`` names the submodule when there is one, else the package's own name.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {t for t in targets if t in files and t not in EXEMPT and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a path
    ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, inside the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_graph_sees_lazy_imports_and_package_reexports():
    graph = import_graph()
    assert "metarl_robot.real2sim.identify" in graph["metarl_robot.demo"]  # imported inside a function
    assert "metarl_robot.logs.reader" in graph["metarl_robot.logs"]


def test_cycle_finder_reports_each_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in metarl_robot:\n" + "\n".join(" -> ".join(c) for c in found)
