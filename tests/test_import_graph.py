"""The package's module import graph has no circle (every import counted: top-level, lazy, TYPE_CHECKING),
and the SD loading layer (models/) never imports the embedded demo world (tiny/)."""
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


def test_graph_is_found():
    graph = _graph()
    assert "textcraftor_fast.tiny.world" in graph["textcraftor_fast.loaders"]
    assert "textcraftor_fast.models" in graph["textcraftor_fast.tiny.world"]


def test_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_models_never_import_the_demo_world():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(f"{PKG}.models"):
            assert not any(d.startswith(f"{PKG}.tiny") for d in deps), (name, deps)


def test_a_planted_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
