"""The package's layering, read from its source with ast: no import cycles between tiled_hydra modules
(imports at module level and inside functions alike), no private name imported from another module,
and one composition root (tiled_hydra/build.py) that wires the run's objects."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "tiled_hydra"
#: The classes only the composition root constructs (everything else asks build.py for them).
WIRED = ("SlotStore", "SlotTrainer", "InferenceEngine", "TileFeatures")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module, names) pairs an import statement of module ``name`` brings in; relative imports resolved."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    if node.level:  # from .x import y / from .. import y
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        out.append((submodule, []) if submodule in known else (base, [alias.name]))
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> tiled_hydra modules it imports, and every private name imported across modules."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    private = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, names in imported(node, name, path, known):
                if target not in known or target == name:
                    continue
                graph[name].add(target)
                private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with the path on a stack)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_every_kind_of_import():
    graph, _ = import_graph()
    assert "tiled_hydra.build" in graph["tiled_hydra.pipeline"]  # module level, from-import of names
    assert "tiled_hydra.build" in graph["tiled_hydra.cli.predict"]  # inside a function
    assert "tiled_hydra.slots.store" in graph["tiled_hydra.slots.trainer"]
    # relative imports resolve; a submodule is an edge to it, a name an edge to the module defining it
    node = ast.parse("from ..core import tiling, _hidden").body[0]
    assert imported(node, "tiled_hydra.slots.store", PACKAGE / "slots" / "store.py", {"tiled_hydra.core.tiling": Path()}) == [
        ("tiled_hydra.core.tiling", []), ("tiled_hydra.core", ["_hidden"])]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_modules():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_from_other_modules():
    _, private = import_graph()
    assert private == []


def constructions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if called in WIRED:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {called}(")
    return found


def test_build_is_the_only_module_that_wires_the_run():
    outside = sorted(p for p in [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
                     if p != PACKAGE / "build.py")
    found = [c for p in outside for c in constructions(p)]
    assert found == [], "construct these through tiled_hydra.build: " + "; ".join(found)
    assert {c.split()[-1] for c in constructions(PACKAGE / "build.py")} == {f"{name}(" for name in WIRED}
