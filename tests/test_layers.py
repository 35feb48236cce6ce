"""The house's layering: evals <- pipeline <- sessions <- tui, and a core that never needs Textual.

Read from the source (every import statement, also the ones inside functions), so a lazy import
that breaks the rule is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["evals", "pipeline", "sessions", "tui"]  # each may import only the ones before it
CORE = ["evals", "pipeline", "sessions"]


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(module: str) -> str | None:
    """`frankenlab.pipeline.runner` -> "pipeline"; a bare `pipeline...` (the old, colliding name) -> "bare"."""
    parts = module.split(".")
    if parts[0] == "frankenlab":
        return parts[1] if len(parts) > 1 else "frankenlab"
    return "bare" if parts[0] in LAYERS else None


def imported_packages(path: Path) -> set[str]:
    """Layers of the project's packages that `path` imports (absolute or relative)."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(ROOT).parts[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {layer_of(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else layer_of(node.module or ""))
    return found - {None}


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_from_a_higher_layer(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) - allowed) for p in modules(package)}
    assert not {k: v for k, v in bad.items() if v}, f"{package} may import only {sorted(allowed)}"


@pytest.mark.parametrize("package", CORE)
def test_core_imports_without_textual(package):
    names = [
        "frankenlab." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in modules(package)
    ]
    code = (
        f"import importlib, sys\nfor n in {names!r}:\n    importlib.import_module(n)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- no import cycles between the project's modules -------------------------------------------------
def module_name(path: Path) -> str:
    """`pipeline/quant.py` -> `frankenlab.pipeline.quant`; a package's `__init__.py` -> the package."""
    return "frankenlab." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph(packages: list[str]) -> dict[str, set[str]]:
    """{module: the project's modules it imports}, from every import statement of its source (also the
    lazy ones inside functions). `from a.b import c` imports `a.b`, and `a.b.c` too when that is a module.
    A package's `__init__` counts only where it is named: the statements say what runs, its children
    do not import it again."""
    files = {module_name(p): p for package in packages for p in modules(package)}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in files and t != name}
        graph[name] = found
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    graph = import_graph(LAYERS)
    # the graph is read right: the pair that once was a circle is there, one way only, with their leaf
    assert "frankenlab.pipeline.quant_cpu" in graph["frankenlab.pipeline.quant"]
    assert "frankenlab.pipeline.quant" not in graph["frankenlab.pipeline.quant_cpu"]
    assert "frankenlab.pipeline.quant_linear" in graph["frankenlab.pipeline.quant_cpu"]
    assert graph["frankenlab.pipeline.quant_linear"] <= {"frankenlab.evals.errors"}
    assert "frankenlab.pipeline.quant" in graph["frankenlab.pipeline.loading"]  # imported inside a function
    assert import_cycles(graph) == []
