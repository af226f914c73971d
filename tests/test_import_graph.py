"""No import cycles among the modules of the four packages (read from their source with `ast`, every import counted:
module level, inside functions, under TYPE_CHECKING). Importing another package's module runs that package's
__init__ too, so it counts as an import of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("k2jax", "checkpoints", "sharding", "pallas_kernels")


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages (a package's __init__ under the package's name)."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that the module `name` imports anywhere in its source."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target in modules:
                found.add(target)
            if target.split(".")[0] in PACKAGES and target.split(".")[0] != name.split(".")[0]:
                found.add(target.split(".")[0])  # another package's __init__ runs first
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", set(files))
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert {"k2jax.sampling", "sharding", "sharding.mesh"} <= graph["k2jax.engine"]
    assert {"k2jax.engine", "k2jax.scheduler", "k2jax.tokenizer"} <= graph["k2jax.llm"]
    assert "checkpoints" in graph["k2jax.loading"] and "pallas_kernels.int4_layout" in graph["checkpoints.hf_names"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))
