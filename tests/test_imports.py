"""The house's shape: no import cycle among aha's modules (counting the imports inside functions too),
infra/ and tasks/ import nothing above them, and no file is over 400 lines or function over 80."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "aha"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The aha modules `path` imports (a `from aha.x import name` of a submodule counts as that module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("aha.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aha"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def graph(top_level_only: bool = False) -> dict[str, set[str]]:
    return {name: {m for m in imports(path, top_level_only) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `edges` as a path of module names, or None (depth-first search, three colours)."""
    colour, stack = dict.fromkeys(edges, 0), []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        colour[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module level", "with lazy imports"])
def test_no_import_cycle(top_level_only):
    cycle = find_cycle(graph(top_level_only))
    assert cycle is None, " -> ".join(cycle)


# the base of the house: what each lower folder may import at module level
BASE = {"aha.infra": ("aha.infra",), "aha.tasks": ("aha.infra", "aha.tasks")}


def folder(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_arrow_runs_back_up():
    """infra imports only infra and tasks only infra and tasks (at module level; a function may
    reach up lazily, e.g. `Config.loss_spec`)."""
    upward = sorted(f"{a} -> {b}" for a, targets in graph(top_level_only=True).items() for b in targets
                    if folder(a) in BASE and folder(b) not in BASE[folder(a)])
    assert upward == []


def test_no_file_over_400_lines_and_no_function_over_80():
    """Every non-test file of the project: the package and the bench scripts."""
    files = [p for folder in (ROOT, ROOT.parent / "bench") for p in sorted(folder.rglob("*.py"))]
    long_files = [f"{p.relative_to(ROOT.parent)}: {n}" for p in files if (n := p.read_text().count("\n")) > 400]
    long_functions = [f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}"
                      for p in files for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 80]
    assert long_files == [] and long_functions == []
