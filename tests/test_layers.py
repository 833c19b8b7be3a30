"""uue/ reads top-down: config -> data -> model -> train / evaluation / index -> serving -> cli.

Every module under uue/ is parsed (not imported) and each import of a uue module counts, wherever it stands:
at module level, inside a function, or under `if TYPE_CHECKING`. A module may import its own layer and the
layers below it, never one above, and the import graph has no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "uue"
LAYERS = {"config": 0, "data": 1, "model": 2, "train": 3, "evaluation": 3, "index": 3, "serving": 4, "cli": 5}
"""Layer of each top-level part of uue/ (train, evaluation and index are one floor: they share nothing)."""
TOP = 6
"""uue/__init__.py: the public API, re-exporting from every floor."""


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module under uue/ (a package by its __init__.py)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    return TOP if len(parts) == 1 else LAYERS[parts[1]]


def _imports(module: str, path: Path) -> set[str]:
    """The uue modules `module` imports: `from a.b import c` counts as a.b.c when that is a module, else a.b."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . / .. import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_part_of_uue_has_a_layer():
    assert {m.split(".")[1] for m in MODULES if "." in m} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_up_a_layer(module):
    upward = sorted(target for target in GRAPH[module] if _layer(target) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"


def test_no_import_circle():
    """Tarjan's strongly connected components: every component is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_imports_inside_functions_and_type_checking_blocks():
    """The graph holds the function-level and TYPE_CHECKING imports this layout relies on being counted."""
    assert "uue.model.encode" in GRAPH["uue.evaluation.calibration"]  # imported inside calibrate_model
    assert "uue.train.stream" in GRAPH["uue.train.loss"]  # under `if TYPE_CHECKING`
