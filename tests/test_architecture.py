"""The package's shape, checked: four layers that import one way, no import cycles, a reason beside
every function-local import, and torch-free modules that stay torch-free.

`python -m tests.test_architecture` prints the figures behind it: lines per module, the longest
functions and the import graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "toolkit"
# Each layer may import the layers before it, never one after it.
LAYERS = ("core", "training", "artifacts", "apps")
# Modules that must import without torch: the command line, serving an ONNX model, and `toolkit status`.
TORCH_FREE = ("toolkit.apps.cli", "toolkit.apps.predict", "toolkit.apps.loadtest", "toolkit.artifacts.backends",
              "toolkit.artifacts.onnx_runtime", "toolkit.artifacts.onnx_checks", "toolkit.training.config",
              "toolkit.training.status", "toolkit.apps.serve", "toolkit.apps.serving.protocol",
              "toolkit.apps.serving.batcher", "toolkit.apps.serving.metrics", "toolkit.apps.serving.config",
              "toolkit.core.images")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported toolkit module, line, inside a function) for every toolkit import in a file.

    `from toolkit.artifacts import formats` imports the module toolkit.artifacts.formats.
    """
    known = modules()
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("toolkit"):
                found.extend((f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known else child.module,
                              child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("toolkit"))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_one_way() -> None:
    wrong = [f"{name} -> {target} (line {line})" for name, path in modules().items() for target, line, _ in imports(path)
             if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)]
    assert not wrong, "imports against the layer order core -> training -> artifacts -> apps:\n" + "\n".join(wrong)


def test_every_module_belongs_to_a_layer() -> None:
    assert {name for name in modules() if layer(name) is None} == {"toolkit", "toolkit.__main__"}


def test_no_import_cycles() -> None:
    graph = defaultdict(set)
    for name, path in modules().items():
        graph[name] |= {t for t, _, _ in imports(path) if t != name}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_function_local_imports_say_why() -> None:
    """Any import inside a function (toolkit or not) carries a comment on its line saying why it is there."""
    silent = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                silent += [f"{path.relative_to(ROOT)}:{n.lineno}: {lines[n.lineno - 1].strip()}"
                           for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
                           and "#" not in lines[n.lineno - 1]]
    assert not silent, "function-local imports without a reason:\n" + "\n".join(silent)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def report() -> str:
    """Lines per module, the ten longest functions, and the import graph between modules."""
    out = ["lines  module"]
    total = 0
    functions = []
    for name, path in modules().items():
        text = path.read_text()
        total += len(text.splitlines())
        out.append(f"{len(text.splitlines()):5d}  {name}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = len(node.args.args) + len(node.args.kwonlyargs)
                functions.append((node.end_lineno - node.lineno + 1, args, f"{name}.{node.name}"))
    out += [f"{total:5d}  total", "", "longest functions (lines, parameters):"]
    out += [f"{n:5d} {a:3d}  {f}" for n, a, f in sorted(functions, reverse=True)[:10]]
    edges = {(name, t, local) for name, path in modules().items() for t, _, local in imports(path) if t != name}
    out += ["", f"imports between toolkit modules: {sum(not l for *_, l in edges)} at module level, "
                f"{sum(l for *_, l in edges)} inside functions", ""]
    out += [f"{a} -> {b}{' (in a function)' if local else ''}" for a, b, local in sorted(edges)]
    return "\n".join(out)


if __name__ == "__main__":
    print(report())
