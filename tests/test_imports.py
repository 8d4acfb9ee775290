"""The package's import graph: no circles, no private names across modules, rooms depend one way.

Every ``import`` / ``from … import`` statement in ``prunelab/`` counts, the ones inside functions
included (a lazy import is still a dependency; it only hides a circle until run time)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prunelab"

# Rooms, lowest first: a module may import its own room and the rooms before it, never after.
# "library" is everything not named here (models, pruning, metrics, data, training, units, …).
ROOMS = ["library", "engine", "store", "runs", "study", "results", "cli"]
ROOM_OF_TOP = {
    "engine": "engine",
    "store": "store",
    "runs": "runs",
    "study": "study",
    "results": "results",
    "cli": "cli",
    "cli_model": "cli",
    "cli_study": "cli",
    "experiments": "cli",
    "__main__": "cli",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every prunelab import of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "prunelab"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "prunelab":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in known else (base, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _, _ in imports(name, path, known):
            while target not in known:  # `import prunelab.a.b` of a name inside a module
                target = target.rpartition(".")[0]
            if target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return ROOM_OF_TOP.get(parts[1], "library") if len(parts) > 1 else "cli"


def test_the_walker_sees_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_no_private_names_imported_across_modules():
    known = modules()
    bad = [
        f"{name} (line {line}) imports {name_} from {target}"
        for name, path in known.items()
        for target, name_, line in imports(name, path, known)
        if name_ is not None and name_.startswith("_") and not name_.startswith("__")
    ]
    assert bad == []


def test_rooms_depend_one_way():
    edges = graph()
    rank = {r: i for i, r in enumerate(ROOMS)}
    bad = [
        f"{a} ({room(a)}) imports {b} ({room(b)})"
        for a, targets in edges.items()
        for b in targets
        if rank[room(b)] > rank[room(a)]
    ]
    assert bad == []


@pytest.mark.parametrize(
    "lower, higher",
    [
        ("metrics", "sparse"),
        ("engine", "runs"),
        ("results", "study"),
        ("results", "runs"),
        ("runs", "study"),
        ("store", "runs"),
    ],
)
def test_named_layers_do_not_import_upwards(lower, higher):
    edges = graph()
    bad = [
        f"{a} imports {b}"
        for a, targets in edges.items()
        if a.startswith(f"prunelab.{lower}")
        for b in targets
        if b.startswith(f"prunelab.{higher}")
    ]
    assert bad == []


def test_every_module_says_what_it_is_for():
    missing = [
        name for name, path in modules().items() if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert missing == []
