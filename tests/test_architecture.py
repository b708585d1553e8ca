"""The import layers of docs/ARCHITECTURE.md hold: no import circle, no import from a lower layer to a higher one.

Every ``import`` in ``src/gqsa`` counts, function-local ones included (they hide a circle from the interpreter,
not from a reader), and importing ``a.b.c`` also imports the packages ``a.b`` (their ``__init__``) unless the
importer is inside that package already. Each module belongs to the layer of its longest listed prefix; a new
module with no layer fails the test until it is placed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gqsa"

# lowest first; a module may import its own layer and those below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("format", ("gqsa.quant", "gqsa.format", "gqsa.modules", "gqsa.runtime", "gqsa.folder_io", "gqsa.sources")),
    ("kernels", ("gqsa.kernels", "gqsa.nn")),
    ("models and storage", ("gqsa.checkpoint", "gqsa.checkpoint_checks", "gqsa.integrations", "gqsa.models",
                            "gqsa.report", "gqsa.config", "gqsa.calib", "gqsa.distributed")),
    ("runtime", ("gqsa.engine",)),
    ("algorithms", ("gqsa.obs", "gqsa.prune", "gqsa.allocation", "gqsa.blockwise", "gqsa.oneshot", "gqsa.head",
                    "gqsa.baselines")),
    ("stages", ("gqsa.stages", "gqsa.baselines.runner")),
    ("orchestration", ("gqsa.pipeline", "gqsa.workflow")),
    ("measurement", ("gqsa.eval", "gqsa.bench", "gqsa.report_matrix", "gqsa.report_tables")),
    ("api", ("gqsa",)),
    ("faces", ("gqsa.cli", "gqsa.commands")),
]
# a package whose __init__ re-exports a module of a higher layer sits with that module
PACKAGE_LAYER = {"gqsa.baselines": "stages"}
# exceptions: (importer, imported, reason); none
ALLOWED: list[tuple[str, str, str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        for t in targets:
            if not (t == "gqsa" or t.startswith("gqsa.")):
                continue
            while t not in modules:  # `import gqsa.x.y` of a name inside a module
                t = t.rpartition(".")[0]
            found.add(t)
            # the packages above it are imported too, unless `name` is inside them already
            parent = t.rpartition(".")[0]
            while parent and parent != "gqsa":
                if not (name == parent or name.startswith(parent + ".")):
                    found.add(parent)
                parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


def _layer(name: str) -> int:
    names = [n for n, _ in LAYERS]
    if name in PACKAGE_LAYER:
        return names.index(PACKAGE_LAYER[name])
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"{name} has no layer: place it in tests/test_architecture.py LAYERS")
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    allowed = {(a, b) for a, b, _ in ALLOWED}
    names = [n for n, _ in LAYERS]
    bad = [f"{a} ({names[_layer(a)]}) imports {b} ({names[_layer(b)]})"
           for a, targets in sorted(_graph().items()) for b in sorted(targets)
           if _layer(b) > _layer(a) and (a, b) not in allowed]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                circles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("name", ["argparse"])
def test_only_the_faces_parse_arguments(name):
    users = [m for m, p in _modules().items() if _layer(m) < [n for n, _ in LAYERS].index("faces")
             and any(isinstance(node, (ast.Import, ast.ImportFrom)) and
                     any(a.name == name for a in node.names) if isinstance(node, ast.Import) else
                     isinstance(node, ast.ImportFrom) and node.module == name
                     for node in ast.walk(ast.parse(p.read_text())))]
    assert not users, f"{name} imported below the command line: {users}"


def test_the_graph_sees_function_local_imports():
    graph = _graph()
    assert "gqsa.pipeline" in graph["gqsa"]  # gqsa.compress imports it inside the function


def test_every_environment_variable_is_in_the_architecture_table():
    """Each ``GQSA_*`` name the package reads (a string literal in ``src/gqsa``) has a row in docs/ARCHITECTURE.md's
    "Environment variables" table, and the table names none the package no longer reads."""
    import re

    used = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("GQSA_"):
                used.update(re.findall(r"\bGQSA_[A-Z0-9_]*[A-Z0-9]\b", node.value))
    doc = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    table = doc[doc.index("## Environment variables"):]
    rows = set(re.findall(r"^\| `(GQSA_[A-Z0-9_]+)` \|", table, flags=re.M))
    assert used, "no GQSA_* variable found: the scan is broken"
    assert not used - rows, f"read by the package but not in the table: {sorted(used - rows)}"
    benchmark_only = {"GQSA_BLOCK_AB"}
    assert not rows - used - benchmark_only, f"in the table but not read any more: {sorted(rows - used - benchmark_only)}"

