"""The package's module import graph (every import counted: top-level, lazy, TYPE_CHECKING) has no circle, imports
only downward through the layers below, and the embedded demo world (tiny/) is a pure client: nothing outside
tiny/ imports it (it plugs in by name, through textcraftor_fast.registry)."""
from __future__ import annotations

import ast
from pathlib import Path

import textcraftor_fast

ROOT = Path(textcraftor_fast.__file__).parent
PKG = "textcraftor_fast"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}  # `from . import data` imports a module
    return {m for m in out if m == PKG or m.startswith(PKG + ".")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py") if "kernels" not in p.parts}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") and node.count(".") < nxt.count("."):
                continue  # a package importing its own submodule is not a circle through the package
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# Lowest first. A module may import its own layer and the layers below, never one above. `tiny` is no layer: the
# demo world may import anything, and nothing outside it may import it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "registry", "config", "atomic"),  # names, settings, replacing files in one step
    ("data", "memory", "memory.saved_bytes", "memory.host_heap", "memory.layers", "ops", "parallel",
     "reporting"),  # mechanisms
    ("models", "rewards", "sampler"),  # the models of a step and the differentiable sampler
    ("memory.policy",),  # the checkpoint plan, measured on a built step
    ("training", "evaluation", "inference"),  # the algorithm and what uses a tuned model
    ("cli", ""),  # entry points: the command line and the package's public API (__init__)
)
CLIENT = "tiny"


def _layer(module: str) -> int:
    """The index of the layer `module` belongs to (the longest matching prefix decides)."""
    rel = module.removeprefix(PKG).removeprefix(".")
    best = (-1, -1)
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if rel == prefix or rel.startswith(prefix + ".") or (prefix == "" and rel == ""):
                best = max(best, (len(prefix), index))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, deps in graph.items():
        if _is_client(name):
            continue
        for dep in deps:
            if _is_client(dep):
                found.append(f"{name} -> {dep} (the demo world is a client: reach it by name, through the registry)")
            elif _layer(dep) > _layer(name):
                found.append(f"{name} (layer {_layer(name)}) -> {dep} (layer {_layer(dep)})")
    return sorted(found)


def _is_client(module: str) -> bool:
    return module == f"{PKG}.{CLIENT}" or module.startswith(f"{PKG}.{CLIENT}.")


def test_graph_is_found():
    graph = _graph()
    assert "textcraftor_fast.models.components" in graph["textcraftor_fast.training.trainer"]
    assert "textcraftor_fast.registry" in graph["textcraftor_fast.tiny.plugin"]
    assert len(graph) > 60


def test_every_module_is_in_a_layer_and_imports_only_downward():
    graph = _graph()
    for name in graph:
        if not _is_client(name):
            _layer(name)
    assert upward_imports(graph) == []


def test_nothing_outside_the_demo_world_imports_it():
    graph = _graph()
    assert [f"{n} -> {d}" for n, deps in graph.items() if not _is_client(n) for d in deps if _is_client(d)] == []


def test_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_a_planted_upward_import_and_a_planted_client_import_are_found():
    graph = {f"{PKG}.config": {f"{PKG}.training.trainer"}, f"{PKG}.training.trainer": {f"{PKG}.tiny.world"},
             f"{PKG}.tiny.world": {f"{PKG}.models"}}
    assert upward_imports(graph) == [
        f"{PKG}.config (layer 0) -> {PKG}.training.trainer (layer 4)",
        f"{PKG}.training.trainer -> {PKG}.tiny.world (the demo world is a client: reach it by name, through the "
        "registry)"]


def test_a_planted_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
