"""frankenlab installed as a user installs it: only `frankenlab` goes on the import path.

A wheel of this project (not an editable install) goes into a fresh venv that already holds a
distribution named `evals` (there is one on PyPI), next to a third-party stage registered through the
`frankenlab.stages` entry point. A recipe then runs from a folder with its own `pipeline/`, `tui/` and
`sessions/` packages (the current folder is on sys.path): the run finishes, the user's `evals` is still
the `evals`, and no bare `evals`, `pipeline`, `sessions` or `tui` module came from this project.

No network and no second torch: the fresh venv sees the libraries of the venv running the tests
through a .pth file that holds plain paths (a plain path line does not run that folder's own .pth
files, so the editable install of the checkout is not loaded there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from frankenlab.evals import toml
from tests.test_stage_protocol import PLUGIN_MODULE, PLUGIN_SOURCE

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = toml.loads((ROOT / "pyproject.toml").read_text())
PROJECT_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # {"frankenlab.evals": "evals", ...}
BARE_NAMES = ("evals", "pipeline", "sessions", "tui")
USER_EVALS_MARKER = "the user's own evals package"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def pip(*args) -> None:
    """pip of the venv running the tests: offline, and without build isolation (setuptools is here)."""
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args])


def build_wheel(source: Path, wheels: Path) -> Path:
    before = set(wheels.glob("*.whl"))
    pip("wheel", "--no-index", "--no-deps", "--no-build-isolation", "-w", wheels, source)
    (built,) = set(wheels.glob("*.whl")) - before
    return built


def project_copy(dest: Path) -> Path:
    """The files a build reads (top-level files and the mapped package folders), so that building
    writes nothing into the checkout (setuptools builds in the source folder)."""
    dest.mkdir()
    for item in ROOT.iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, dest / item.name)
    for folder in PROJECT_DIRS.values():
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def small_distribution(dest: Path, name: str, files: dict[str, str], extra: str = "", version: str = "1.0") -> Path:
    for rel, text in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    (dest / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n{extra}'
    )
    return dest


def clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on the fresh venv's import path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def library_paths() -> list[str]:
    """Where the test venv's libraries live (its site-packages; a venv made with --system-site-packages
    on a GPU box also reads the base Python's, where its CUDA torch is)."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the user's `evals`, a third-party stage, and a wheel of this project."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    wheels.mkdir()
    ours = build_wheel(project_copy(tmp / "source"), wheels)
    user_evals = small_distribution(
        tmp / "user-evals",
        "evals",
        {"evals/__init__.py": f"MARKER = {USER_EVALS_MARKER!r}\n"},
        '[tool.setuptools]\npackages = ["evals"]\n',
    )
    plugin = small_distribution(
        tmp / "plugin",
        "halve-stage",
        {f"{PLUGIN_MODULE}.py": PLUGIN_SOURCE},
        f'[project.entry-points."frankenlab.stages"]\nhalve = "{PLUGIN_MODULE}"\n'
        f'[tool.setuptools]\npy-modules = ["{PLUGIN_MODULE}"]\n',
    )
    others = [build_wheel(user_evals, wheels), build_wheel(plugin, wheels)]

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])  # on the base interpreter, not this venv
    python = venv / "bin" / "python"
    pip("--python", python, "install", "--no-index", "--no-deps", *others, ours)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "zz-test-venv-libraries.pth").write_text("".join(p + "\n" for p in library_paths()))
    return venv, site


def test_the_wheel_holds_every_module_and_the_console_script(installed, tmp_path):
    venv, site = installed
    missing = [
        f"{folder}/{path.relative_to(ROOT / folder)}"
        for package, folder in PROJECT_DIRS.items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
        and not site.joinpath(*package.split("."), path.relative_to(ROOT / folder)).is_file()
    ]
    assert not missing, f"not in the wheel (add their packages to [tool.setuptools] packages): {missing}"
    assert not any((site / name).exists() for name in ("pipeline", "sessions", "tui"))
    assert (site / "evals" / "__init__.py").read_text() == f"MARKER = {USER_EVALS_MARKER!r}\n"  # untouched
    # the console script, and the recipes shipped as package data (a light command: no torch)
    out = run([venv / "bin" / "frankenlab", "recipes"], cwd=tmp_path, env={**clean_env(), "COLUMNS": "200"})
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert sorted(names) == sorted(p.stem for p in (ROOT / "pipeline" / "recipes").glob("*.toml"))


CHILD = """
import importlib.util, json, sys

import evals  # the user's own package, imported before frankenlab

from frankenlab.tui.cli.main import main

rc = main(["run", "recipe.toml", "--out", "out", "--data-dir", sys.argv[1], "--no-save-models"])
report = {
    "rc": rc,
    "evals_marker": getattr(sys.modules["evals"], "MARKER", None),
    "evals_is_same": sys.modules["evals"] is evals,
    "importable": {name: importlib.util.find_spec(name).origin for name in ("pipeline", "sessions", "tui")},
    "modules": {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())},
}
with open("modules.json", "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow  # a run in a new interpreter (torch, transformers): half a minute more
def test_a_run_from_a_folder_with_its_own_pipeline_imports_only_frankenlab(
    installed, tmp_path, tiny_model_dir, data_dir
):
    venv, site = installed
    work = tmp_path / "my-project"
    for name in ("pipeline", "tui", "sessions"):  # the user's own packages, importable from the current folder
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(f'MARKER = "the user\'s own {name}"\n')
    (work / "recipe.toml").write_text(f"""
name = "installed"
model = "{tiny_model_dir}"
[calibration]
samples = 4
seq_len = 32
[evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
[[stages]]
kind = "depth"
k = 1
[[stages]]
kind = "halve"
""")
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}  # a tiny model on a shared machine
    run([venv / "bin" / "python", "-c", CHILD, data_dir], cwd=work, env=env)

    report = json.loads((work / "modules.json").read_text())
    assert report["rc"] == 0
    session = json.loads((work / "out" / "session.json").read_text())
    assert session["status"] == "done"
    assert [s["kind"] for s in session["stages"]] == ["baseline", "depth", "halve"]
    assert session["writer"]["version"] == PYPROJECT["project"]["version"]  # the wheel's metadata, read installed

    assert report["evals_marker"] == USER_EVALS_MARKER and report["evals_is_same"]
    # the user's packages were importable under the bare names all along (the current folder is on the path) ...
    assert report["importable"] == {n: str(work / n / "__init__.py") for n in ("pipeline", "sessions", "tui")}
    # ... and nothing imported them, nor anything else by a bare name of ours
    modules = report["modules"]
    bare = sorted(n for n in modules if n.split(".")[0] in BARE_NAMES)
    assert bare == ["evals"], f"bare project names imported: {bare}"
    assert modules["evals"] == str(site / "evals" / "__init__.py")
    ours = {n: f for n, f in modules.items() if n.split(".")[0] == "frankenlab" and f}
    assert "frankenlab.pipeline" in ours and "frankenlab.tui.cli.main" in ours and "frankenlab.sessions" in ours
    assert ours["frankenlab.pipeline"] == str(site / "frankenlab" / "pipeline" / "__init__.py")
    outside = {n: f for n, f in ours.items() if not f.startswith(str(site / "frankenlab") + os.sep)}
    assert not outside, f"frankenlab modules not from the installed wheel: {outside}"
    assert modules[PLUGIN_MODULE] == str(site / f"{PLUGIN_MODULE}.py")  # the entry point's stage, installed
    checkout = tuple(str(ROOT / d) + os.sep for d in [*PROJECT_DIRS.values(), "tests", "benchmarks"])
    assert not [f for f in modules.values() if f and f.startswith(checkout)], "the checkout was imported"


def test_an_editable_install_of_the_old_layout_is_replaced(tmp_path):
    """A venv set up before the namespace holds an editable install with top-level `pipeline`, `tui`...;
    the set-up's `pip install -e` of this version replaces it: no finder for the old names stays."""
    import setuptools

    old = small_distribution(
        tmp_path / "old",
        "frankenlab",
        {f"{name}/__init__.py": "" for name in BARE_NAMES} | {"tui/cli.py": "def main():\n    return 0\n"},
        '[project.scripts]\nfrankenlab = "tui.cli:main"\n'
        '[tool.setuptools.packages.find]\ninclude = ["tui*", "pipeline*", "evals*", "sessions*"]\n',
        version="0.1.0",
    )
    new = project_copy(tmp_path / "new")
    version = PYPROJECT["project"]["version"]
    # the new venv builds with the test venv's setuptools (and nothing else of it: pip must see only this venv)
    tools = tmp_path / "tools"
    tools.mkdir()
    libs = Path(setuptools.__file__).parent.parent
    for name in (
        "setuptools",
        "_distutils_hack",
        "pkg_resources",
        *(p.name for p in libs.glob("setuptools-*.dist-info")),
    ):
        if (libs / name).exists():
            (tools / name).symlink_to(libs / name)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "tools.pth").write_text(f"{tools}\n")
    probe = (  # where each name imports from, in that venv, from a folder without those packages
        "import importlib.util as u, json, sys\n"
        "def origin(name):\n"
        "    try:\n"
        "        return getattr(u.find_spec(name), 'origin', None)\n"
        "    except ModuleNotFoundError:  # its parent package is not there\n"
        "        return None\n"
        "print(json.dumps({n: origin(n) for n in sys.argv[1:]}))"
    )
    names = [*BARE_NAMES, "frankenlab.pipeline"]

    pip("--python", python, "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", old)
    before = json.loads(run([python, "-c", probe, *names], cwd=tmp_path).stdout)
    assert before["pipeline"] == str(old / "pipeline" / "__init__.py")  # the stand-in is the old layout
    assert before["frankenlab.pipeline"] is None

    pip("--python", python, "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", new)
    after = json.loads(run([python, "-c", probe, *names], cwd=tmp_path).stdout)
    assert after == {**dict.fromkeys(BARE_NAMES), "frankenlab.pipeline": str(new / "pipeline" / "__init__.py")}
    assert [p.name for p in site.glob("frankenlab-*.dist-info")] == [f"frankenlab-{version}.dist-info"]
    editable = {p.name: p.read_text() for p in site.glob("__editable__*") if p.is_file()}
    assert editable, "no editable install"
    stale = [name for name, text in editable.items() if str(old) in text or "'pipeline'" in text]
    assert not stale, f"left from the old install: {stale}"
    assert "frankenlab.tui.cli.main" in (venv / "bin" / "frankenlab").read_text()
