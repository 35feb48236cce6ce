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
    # the timeout only guards against a hung interpreter: these imports take seconds idle and can take
    # minutes on a loaded machine, so it is far above either
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
