"""Imports go one way: moe <- parallel <- profiling <- train <- (interop, job) <- plan <- launch.

Parses every shipped module of the one import package `moeyard` with `ast`, collects every import of a
project package, function-local imports included so none can hide a cycle, and fails on an import of a
higher layer, on a cycle between modules, and on a project import not spelled `moeyard.…`. A rank's start
imports neither the Hugging Face interop nor `tokenizers`.

    .venv/bin/pytest -q tests/unit/test_layering.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYER_RANK = {"moe": 0, "parallel": 1, "profiling": 2, "train": 3, "interop": 4, "job": 4, "plan": 5, "launch": 6}
"""Each shipped folder's layer: a module may import its own layer or a lower one. interop (HF, upcycling,
`prepare`) and job (the schema and layout rules) are side by side: neither imports the other."""
LAYERS = tuple(LAYER_RANK)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(["moeyard", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def layer(module: str) -> str:
    """`moeyard.train.trainer` -> `train`."""
    return module.split(".")[1]


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
        found.update(n for n in names if n.split(".")[0] in (*LAYERS, "moeyard"))
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
    upward = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in sorted(deps)
        if LAYER_RANK[layer(dep)] > LAYER_RANK[layer(mod)]
        or (LAYER_RANK[layer(dep)] == LAYER_RANK[layer(mod)] and layer(dep) != layer(mod))
    ]
    assert not upward, upward


def test_every_project_import_goes_through_moeyard() -> None:
    """A bare `import train` would find a user's train.py first; only `moeyard.…` names are ours."""
    bare = [
        f"{path.relative_to(REPO)} imports {name}"
        for folder in LAYERS
        for path in (REPO / folder).rglob("*.py")
        for name in sorted(project_imports(path))
        if not name.startswith("moeyard.")
    ]
    assert not bare, bare


def test_a_rank_imports_no_interop_and_no_tokenizers() -> None:
    """What `python -P -m moeyard.launch.rank` loads before training: the per-rank run only."""
    probe = "import sys, moeyard.launch.rank; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-P", "-c", probe], check=True, capture_output=True, text=True)
    modules = loaded.stdout.split()
    assert "moeyard.train.trainer" in modules
    offenders = [m for m in modules if m.startswith(("moeyard.interop", "moeyard.plan", "tokenizers", "transformers"))]
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_checks_see_a_violation() -> None:
    """The graph helpers catch an upward edge and a cycle when one is planted."""
    graph = import_graph()
    graph["moeyard.moe.router"] = {*graph["moeyard.moe.router"], "moeyard.launch.cli"}
    assert any(LAYER_RANK[layer(d)] > LAYER_RANK["moe"] for d in graph["moeyard.moe.router"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_shipped_module_reads_a_fault_injection_variable() -> None:
    offenders = [str(p) for layer in LAYERS for p in (REPO / layer).rglob("*.py") if "MOEYARD_FAULT" in p.read_text()]
    assert not offenders, offenders
