"""Imports run one way: the package's import graph, read from the source with `ast`.

Every `import` and `from ... import` in every module of `gptoss_mlx` counts, at the top of a file
or inside a function alike, so a cycle cannot hide in a function body. Importing a module also
runs the `__init__.py` of each package above it, which counts as an edge too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gptoss_mlx"
ROOT = "gptoss_mlx"
# The model and the caches, which the kernels (and the reference ops they are checked against)
# serve and must not import.
MODEL = {f"{ROOT}.{m}" for m in ("model", "attention", "moe", "cache")}
BELOW_MODEL = (f"{ROOT}.kernels", f"{ROOT}.ops")
# Modules allowed to import gptoss_mlx modules inside functions, and why (no cycle is involved).
DEFERRED: dict[str, str] = {}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported gptoss_mlx module, whether the import sits inside a function or class) pairs."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested = {
        id(node)
        for scope in ast.walk(tree)
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for node in ast.walk(scope)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith(ROOT) and target != name:
                found.append((target, id(node) in nested))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules its import runs, module -> modules it imports inside functions)."""
    files = module_files()
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    deferred: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in files.items():
        mine = set(_ancestors(name))
        for target, inside in imports_of(name, path, modules):
            runs = [a for a in _ancestors(target) if a not in mine and a != name] + [target]
            graph[name].update(runs)
            if inside:
                deferred[name].add(target)
    return graph, deferred


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
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


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 20 and f"{ROOT}.kernels" in graph[f"{ROOT}.attention"]  # it sees edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_and_reference_ops_import_nothing_of_the_model():
    graph, _ = import_graph()
    for name in graph:
        if name.startswith(BELOW_MODEL):
            wrong = sorted(reachable(graph, name) & MODEL)
            assert not wrong, f"{name} imports {', '.join(wrong)}"


def test_imports_sit_at_the_top():
    """No gptoss_mlx import inside a function outside the modules listed in DEFERRED, and no import
    pushed below the code (`noqa: E402`)."""
    graph, deferred = import_graph()
    late = {m: sorted(d) for m, d in deferred.items() if d and m not in DEFERRED}
    assert not late, f"imports inside functions: {late}"
    for name, path in module_files().items():
        assert "noqa: E402" not in path.read_text(), f"{name} imports below its code"


def test_the_graph_reader_sees_cycles_and_nested_imports(tmp_path, monkeypatch):
    """The reader itself, on a made-up package: a cycle through a function-level import and a
    package __init__, which the tests above must see."""
    pkg = tmp_path / ROOT
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import helper\n")
    (pkg / "sub" / "__init__.py").write_text("from .helper import g\n")
    (pkg / "sub" / "helper.py").write_text("from .. import b\n")
    (pkg / "b.py").write_text("import gptoss_mlx.a\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    graph, deferred = import_graph()
    assert deferred[f"{ROOT}.a"] == {f"{ROOT}.sub.helper"}
    assert f"{ROOT}.sub" in graph[f"{ROOT}.a"]  # importing sub.helper runs sub/__init__.py
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {
        f"{ROOT}.a",
        f"{ROOT}.sub",
        f"{ROOT}.sub.helper",
        f"{ROOT}.b",
    }
