"""Issue 34: `ml/` reads bottom-up. No module of it imports one that imports it back (function-
level imports included), and none imports the web app or the worker."""
from __future__ import annotations

import ast
from pathlib import Path

ML = Path(__file__).resolve().parents[2] / "ml"


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in ML.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[path.stem] = found
    return graph


def test_ml_has_no_import_circle():
    graph = _imports()
    local = {m: {d.split(".")[1] for d in deps if d.startswith("ml.") and d.split(".")[1] in graph}
             for m, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(local[module]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(local):
        if module not in state:
            visit(module, [module])


def test_ml_imports_neither_the_web_app_nor_the_worker():
    for module, deps in _imports().items():
        assert not any(d.split(".")[0] in ("webapp", "worker") for d in deps), module
