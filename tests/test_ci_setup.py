"""`.ci/setup` says what it installs and roughly how long it takes, and hides the editable-install
warnings; `.ci/test` runs the linters before pytest and fails on them (both run against a stand-in
venv whose python and ruff only pretend)."""

from __future__ import annotations

import os
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
