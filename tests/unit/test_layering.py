"""Imports go one way: moe <- parallel <- profiling <- train <- launch.

Parses every shipped module (the five packages and benchmarks' neighbours are not shipped) with `ast`,
collects every import of a project package, function-local imports included so none can hide a cycle,
and fails on an import of a higher layer or on a cycle between modules.

    .venv/bin/pytest -q tests/unit/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("moe", "parallel", "profiling", "train", "launch")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Modules of the five packages that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from parallel import checkpoint` imports the module parallel.checkpoint
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in LAYERS)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for layer in LAYERS for p in (REPO / layer).rglob("*.py")}
    return {name: {m for m in project_imports(path) if m in modules} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path of modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_a_higher_layer() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in sorted(deps)
        if rank[dep.split(".")[0]] > rank[mod.split(".")[0]]
    ]
    assert not upward, upward


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_checks_see_a_violation() -> None:
    """The graph helpers catch an upward edge and a cycle when one is planted."""
    graph = import_graph()
    graph["moe.router"] = {*graph["moe.router"], "launch.cli"}
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    assert any(rank[d.split(".")[0]] > rank["moe"] for d in graph["moe.router"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_shipped_module_reads_a_fault_injection_variable() -> None:
    offenders = [str(p) for layer in LAYERS for p in (REPO / layer).rglob("*.py") if "MOEYARD_FAULT" in p.read_text()]
    assert not offenders, offenders
