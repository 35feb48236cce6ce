"""Python 3.10 through 3.12: what the project declares, and nothing in the tree that only 3.11 has.

CI runs one Python, so the 3.10 path is checked here on whichever runs the tests: TOML is read through
`frankenlab.evals.toml`, which takes `tomli` where `tomllib` is missing (checked in a child process
whose `tomllib` is hidden), no module imports `tomllib` or another 3.11-only name itself, and, where
a Python 3.10 interpreter is at hand, every source file compiles with it.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from frankenlab.evals import toml

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("evals", "pipeline", "sessions", "tui", "benchmarks", "docs", "tests")
PYPROJECT = toml.loads((ROOT / "pyproject.toml").read_text())

# Names the standard library gained in 3.11 (module -> names); `tomllib` is the whole module.
NEW_IN_311 = {
    "tomllib": None,
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "NotRequired",
               "Required", "TypeVarTuple", "Unpack", "dataclass_transform", "get_overloads", "clear_overloads"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember", "global_enum"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "operator": {"call"},
    "inspect": {"getmembers_static"},
    "logging": {"getLevelNamesMapping"},
}  # fmt: skip
NEW_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def python_files() -> list[Path]:
    files = []
    for folder in SOURCE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*.py") if "__snapshots__" not in p.parts]
    return sorted(files)


def uses_of_311_only(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "tomllib"]
        elif isinstance(node, ast.ImportFrom) and node.module in NEW_IN_311 and not node.level:
            names = NEW_IN_311[node.module]
            found += [f"{node.module}.{a.name}" for a in node.names if names is None or a.name in names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = NEW_IN_311.get(node.value.id)
            if names is not None and node.attr in names:
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
            found.append(node.id)
        elif type(node).__name__ == "TryStar":  # `except*` (the node exists from 3.11 on)
            found.append("except*")
    return found


def test_the_project_declares_python_3_10_and_tomli_there():
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    assert 'tomli>=2; python_version < "3.11"' in PYPROJECT["project"]["dependencies"]
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py310"  # ruff refuses 3.11-only syntax


def test_nothing_but_the_toml_helper_uses_what_only_python_3_11_has():
    offenders = {}
    for path in python_files():
        found = uses_of_311_only(ast.parse(path.read_text(), str(path)))
        if path == ROOT / "evals" / "toml.py":
            assert found == ["tomllib"]  # the one place, with its fallback
        elif found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"3.11-only names (read TOML through frankenlab.evals.toml): {offenders}"


def test_the_check_sees_each_kind_of_3_11_only_use():
    source = (
        "import tomllib\nfrom typing import Self\nimport datetime\nt = datetime.UTC\n"
        "from enum import StrEnum\ntry:\n    pass\nexcept* ValueError:\n    pass\nraise ExceptionGroup('x', [])\n"
    )
    assert sorted(uses_of_311_only(ast.parse(source))) == sorted(
        ["tomllib", "typing.Self", "datetime.UTC", "enum.StrEnum", "except*", "ExceptionGroup"]
    )


FALLBACK_CHECK = """
import sys
sys.modules["tomllib"] = None  # as on Python 3.10: `import tomllib` raises ModuleNotFoundError
from frankenlab.evals import toml
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.targets import load_targets, parse_targets
import tomli
assert toml.PARSER == "tomli", toml.PARSER
assert toml.loads is tomli.loads and toml.TOMLDecodeError is tomli.TOMLDecodeError
assert sys.modules["tomllib"] is None  # the standard library's parser was never imported
assert "h100" in load_targets()  # the bundled targets files, read through tomli
try:
    parse_targets("x = [", "bad.toml")
except RecipeError as exc:
    print("refused:", exc)
print("parser:", toml.PARSER)
"""


def test_tomli_is_taken_where_tomllib_is_missing():
    out = subprocess.run([sys.executable, "-c", FALLBACK_CHECK], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "parser: tomli" in out.stdout
    assert "refused: bad.toml: not valid TOML" in out.stdout  # tomli's error is turned into the one-line message


def test_tomllib_is_taken_where_the_standard_library_has_it():
    out = subprocess.run(
        [sys.executable, "-c", "from frankenlab.evals import toml; print(toml.PARSER)"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("tomllib" if sys.version_info >= (3, 11) else "tomli")


def python_3_10() -> str | None:
    """A working Python 3.10 interpreter on this machine (a pyenv shim that is not enabled does not count)."""
    candidates = [shutil.which("python3.10")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    for exe in filter(None, candidates):
        out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return exe
    return None


def test_every_source_file_compiles_with_python_3_10(tmp_path):
    exe = python_3_10()
    if exe is None:
        pytest.skip("no Python 3.10 interpreter on this machine (the AST check above still runs)")
    out = subprocess.run(
        [exe, "-m", "compileall", "-q", *[str(p) for p in python_files()]],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path)},  # no .pyc files left in the checkout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
