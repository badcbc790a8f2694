"""Imports flow one way: cli -> commands -> training -> methods -> models -> layers -> autodiff -> ops.

Every ``import`` of a ``reference`` or ``gpu`` module, at the top of a file or
inside a function, is read from the source (the AST, so nothing is imported)
and checked against the layer of each side: a module may import its own layer
and the layers below, never one above, and no chain of imports may come back
to where it started. A new module fails here until it is given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module belongs to the first entry that names it or a package above it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("reference", "reference.errors", "reference.files", "reference.caches",
                    "reference.contracts", "reference.memory", "reference.runtime")),
    ("ops", ("reference.ops", "gpu", "reference.backend")),
    ("autodiff", ("reference.autodiff", "reference.functional")),
    ("layers", ("reference.nn",)),
    ("models", ("reference.models", "reference.accounting")),
    ("methods", ("reference.sparsity", "reference.optim", "reference.schedules")),
    ("training", ("reference.data", "reference.imagefolder", "reference.checkpoint", "reference.config",
                  "reference.build", "reference.summary", "reference.rundir", "reference.distributed",
                  "reference.train")),
    ("commands", ("reference.finalize", "reference.report", "reference.export", "reference.onnx_export",
                  "reference.compare")),
    ("cli", ("reference.cli", "reference.__main__")),
]  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("reference", "gpu"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    if best is None:
        raise AssertionError(f"module {module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def _imports(module: str) -> set[str]:
    """The ``reference``/``gpu`` modules ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_up(module):
    mine = _layer(module)
    upward = sorted(t for t in GRAPH[module] if _layer(t) > mine)
    assert not upward, (
        f"{module} ({LAYERS[mine][0]}) imports {', '.join(f'{t} ({LAYERS[_layer(t)][0]})' for t in upward)}"
    )


def _cycle() -> list[str] | None:
    """One import cycle among the modules, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The scan is of the source, so a late (function-level) import counts like a top-level one."""
    assert "reference.ops" in GRAPH["reference.autodiff"]  # imported inside apply_with_cache
    GRAPH["reference.autodiff"].add("reference.functional")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["reference.autodiff"].discard("reference.functional")
