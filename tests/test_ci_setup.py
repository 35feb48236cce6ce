"""`.ci/setup` says what it installs and roughly how long it takes, hides the editable-install
warnings, installs the torch gptqmodel 7.6.0 works with and warns about an installed one outside
that range; `.ci/test` runs the linters before pytest and fails on them (both run against a stand-in
venv whose python and ruff only pretend)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$(dirname "$0")/calls.log"
if [[ "$1 $2" == "-m pytest" ]]; then exit "${FAKE_PYTEST_RC:-0}"; fi
if [[ " $* " == *" install "* ]]; then
  echo "SetuptoolsDeprecationWarning: editable installs via setup.py develop are deprecated" >&2
  echo "!!" >&2
  echo "        ********************************************************************************" >&2
  echo "        Please avoid running setup.py directly." >&2
fi
exit 0
"""

FAKE_RUFF = """#!/usr/bin/env bash
echo "ruff $*" >> "$(dirname "$0")/calls.log"
if [[ $1 == check ]]; then exit "${FAKE_RUFF_CHECK_RC:-0}"; fi
exit "${FAKE_RUFF_FORMAT_RC:-0}"
"""


def fake_venv(tmp_path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("ruff", FAKE_RUFF)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return venv


def run_ci(script: str, venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / script), *args],
        env={**os.environ, "FRANKENLAB_VENV": str(venv), **env},
        capture_output=True,
        text=True,
    )


def calls(venv: Path) -> list[str]:
    return (venv / "bin" / "calls.log").read_text().splitlines()


def test_setup_says_what_it_installs_and_hides_editable_warnings(tmp_path):
    venv = fake_venv(tmp_path)
    out = run_ci("setup", venv)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "installing frankenlab and its libraries" in text and "usually" in text and "ready after" in text
    assert "bundled model" in text
    assert "SetuptoolsDeprecationWarning" not in text and "setup.py" not in text and "!!" not in text
    assert f"install -e {ROOT}[quant,test]" in "\n".join(calls(venv))


def test_ci_test_runs_the_linters_then_pytest_with_the_arguments(tmp_path):
    venv = fake_venv(tmp_path)
    out = run_ci("test", venv, "-m", "not slow", "-q")
    assert out.returncode == 0, out.stderr
    log = calls(venv)
    ruff = [line for line in log if line.startswith("ruff")]
    assert ruff == ["ruff check --quiet .", "ruff format --check --quiet ."]
    assert log[-1] == "python -m pytest -m not slow -q"  # the fast subset: arguments reach pytest as given
    assert log.index(ruff[-1]) < log.index(log[-1])


@pytest.mark.parametrize("failing", ["FAKE_RUFF_CHECK_RC", "FAKE_RUFF_FORMAT_RC"])
def test_ci_test_fails_on_lint_with_the_fix_in_one_line(tmp_path, failing):
    venv = fake_venv(tmp_path)
    out = run_ci("test", venv, **{failing: "1"})
    assert out.returncode == 1
    fix = f"{venv}/bin/ruff format . && {venv}/bin/ruff check --fix ."
    assert [line for line in out.stderr.splitlines() if fix in line and "linters found problems" in line]
    log = calls(venv)
    assert "ruff check --quiet ." in log and "ruff format --check --quiet ." in log  # both report, then stop
    assert not [line for line in log if "pytest" in line]


@pytest.mark.parametrize(("pytest_rc", "expected"), [(5, 1), (1, 1), (0, 0)])
def test_ci_test_exit_code_follows_pytest_and_no_tests_is_a_failure(tmp_path, pytest_rc, expected):
    venv = fake_venv(tmp_path)
    out = run_ci("test", venv, FAKE_PYTEST_RC=str(pytest_rc))
    assert out.returncode == expected, out.stderr
    assert ("collected no tests" in out.stderr) == (pytest_rc == 5)


# A base Python (or venv) whose torch is $FAKE_TORCH (unset: no torch) and, for the version query,
# "$FAKE_TORCH $FAKE_CUDA" as `print(torch.__version__, torch.version.cuda or "")` prints it.
FAKE_PYTHON_WITH_TORCH = """#!/usr/bin/env bash
echo "python $*" >> "$(dirname "$0")/calls.log"
if [[ " $* " == *" --index-url "* ]]; then exit "${FAKE_INDEX_RC:-0}"; fi
if [[ $1 == -c && $2 == *"import torch"* ]]; then
  [[ -n ${FAKE_TORCH:-} ]] || exit 1
  if [[ $2 == *__version__* ]]; then echo "$FAKE_TORCH ${FAKE_CUDA:-}"; fi
fi
exit 0
"""
SETUP_TOOLS = ("bash", "dirname", "cat", "sha256sum", "cut", "mktemp", "grep", "rm")


def torch_venv(tmp_path, *, nvidia_smi: bool) -> tuple[Path, str]:
    """A stand-in venv, and a PATH that has the tools .ci/setup uses and nvidia-smi only if asked."""
    venv = fake_venv(tmp_path)
    (venv / "bin" / "python").write_text(FAKE_PYTHON_WITH_TORCH)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in SETUP_TOOLS:
        (tools / name).symlink_to(shutil.which(name))
    if nvidia_smi:
        (tools / "nvidia-smi").write_text("#!/usr/bin/env bash\nexit 0\n")
        (tools / "nvidia-smi").chmod(0o755)
    return venv, str(tools)


def torch_installs(venv: Path) -> list[str]:
    return [line for line in calls(venv) if " install " in line and "torch" in line]


@pytest.mark.parametrize("nvidia_smi", [True, False])
def test_setup_installs_the_torch_gptqmodel_7_6_works_with(tmp_path, nvidia_smi):
    venv, path = torch_venv(tmp_path, nvidia_smi=nvidia_smi)
    out = run_ci("setup", venv, PATH=path)
    assert out.returncode == 0, out.stderr
    assert [line.split()[-1] for line in torch_installs(venv)] == ["torch==2.13.0"]  # pinned, CUDA build or not
    assert ("installing torch 2.13.0 with CUDA" in out.stderr) == nvidia_smi
    assert "warning" not in out.stderr


def test_setup_without_a_gpu_takes_the_cpu_build_from_pytorchs_cpu_index(tmp_path):
    venv, path = torch_venv(tmp_path, nvidia_smi=False)
    out = run_ci("setup", venv, PATH=path)
    assert out.returncode == 0, out.stderr
    (install,) = torch_installs(venv)  # the registry's torch for Linux would be the CUDA build (GBs)
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in install and "warning" not in out.stderr


def test_setup_falls_back_to_the_registrys_torch_in_one_line_when_the_cpu_index_fails(tmp_path):
    venv, path = torch_venv(tmp_path, nvidia_smi=False)
    out = run_ci("setup", venv, PATH=path, FAKE_INDEX_RC="1", FRANKENLAB_TORCH_CPU_INDEX="https://mirror.example/cpu")
    assert out.returncode == 0, out.stderr
    tried, fallback = torch_installs(venv)
    assert "--index-url https://mirror.example/cpu torch==2.13.0" in tried and "--timeout 20" in tried
    assert "--index-url" not in fallback and fallback.endswith("install torch==2.13.0")
    (line,) = [line for line in out.stderr.splitlines() if "warning" in line]
    assert (
        "https://mirror.example/cpu gave no CPU build of torch 2.13.0" in line and "FRANKENLAB_TORCH_CPU_INDEX" in line
    )


def test_setup_with_an_empty_cpu_index_asks_the_registry_only(tmp_path):
    venv, path = torch_venv(tmp_path, nvidia_smi=False)
    out = run_ci("setup", venv, PATH=path, FRANKENLAB_TORCH_CPU_INDEX="")
    assert out.returncode == 0, out.stderr
    assert [line.split(" -q ")[-1] for line in torch_installs(venv)] == ["install torch==2.13.0"]
    assert "warning" not in out.stderr


@pytest.mark.parametrize(
    ("torch", "cuda", "warned"),
    [
        ("2.13.0+cu128", "12.8", None),
        ("2.8.0+cu126", "12.6", None),
        ("2.14.1+cu130", "13.0", "newer"),
        ("2.15.0", "13.0", "newer"),
        ("2.10.0+cpu", "", None),
    ],
)
def test_setup_keeps_an_installed_torch_and_warns_once_outside_gptqmodels_range(tmp_path, torch, cuda, warned):
    venv, path = torch_venv(tmp_path, nvidia_smi=True)
    out = run_ci("setup", venv, PATH=path, FAKE_TORCH=torch, FAKE_CUDA=cuda)
    assert out.returncode == 0, out.stderr
    assert torch_installs(venv) == []  # kept: nothing installs torch
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    if warned is None:
        assert warnings == []
    else:
        (line,) = warnings  # one line, naming the version, the build and the range
        assert f"torch {torch} (CUDA {cuda})" in line and warned in line and ">=2.8,<2.14" in line
        assert "it is kept" in line and "torch 2.13.0" in line


def test_setup_replaces_a_torch_too_old_for_gptqmodel_7_6_with_the_pinned_one(tmp_path):
    venv, path = torch_venv(tmp_path, nvidia_smi=True)
    out = run_ci("setup", venv, PATH=path, FAKE_TORCH="2.6.0+cu124", FAKE_CUDA="12.4")
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if "warning" in line]
    assert "torch 2.6.0+cu124 (CUDA 12.4) is older than gptqmodel 7.6.0 needs (>=2.8)" in line
    # pip would take the newest torch for gptqmodel's torch>=2.8: the frankenlab install names the pinned one
    (install,) = torch_installs(venv)
    assert install.endswith(f"install -e {ROOT}[quant,test] torch==2.13.0")
