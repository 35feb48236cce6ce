"""`benchmarks/gpu_smoke.sh`: the environment report, then (with a CUDA device) the gpu tests and the
smoke checks, its exit status failing when either failed; on a CPU machine it says so and passes.
The GPU path runs against a stand-in venv whose python only pretends (as tests/test_ci_setup.py's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$(dirname "$0")/calls.log"
if [[ $1 == - ]]; then cat >/dev/null; echo "python 3.x; torch 9.9.9+cu999"; exit 0; fi
if [[ $1 == -c && $2 == *cuda_available* ]]; then exit "${FAKE_CUDA_RC:-1}"; fi
if [[ $1 == -c ]]; then echo "2 GPU(s) visible: Fake H100, Fake H100"; exit 0; fi
if [[ "$1 $2" == "-m pytest" ]]; then exit "${FAKE_PYTEST_RC:-0}"; fi
if [[ "$1 $2" == "-m benchmarks.gpu_smoke" ]]; then exit "${FAKE_SMOKE_RC:-0}"; fi
exit 0
"""


def run_script(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "FRANKENLAB_VENV": str(venv), **env},
        capture_output=True,
        text=True,
    )  # no per-call timeout: pytest-timeout (pyproject) is the hang guard


def fake_venv(tmp_path) -> Path:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    python = tmp_path / "venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path / "venv"


def calls(venv: Path) -> list[str]:
    return (venv / "bin" / "calls.log").read_text().splitlines()


def test_on_a_cpu_machine_it_reports_the_environment_and_passes():
    venv = Path(sys.executable).parent.parent  # the real venv; conftest hides GPUs (CUDA_VISIBLE_DEVICES="")
    out = run_script(venv, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== environment" in out.stdout and "torch 2." in out.stdout and "gptqmodel 7.6.0" in out.stdout
    assert out.stdout.rstrip().endswith("no CUDA device: nothing to check")
    assert "pytest -m gpu" not in out.stdout


def test_with_a_gpu_it_runs_the_gpu_tests_then_the_smoke_checks_with_the_options(tmp_path):
    venv = fake_venv(tmp_path)
    out = run_script(venv, "--windows", "4", FAKE_CUDA_RC="0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 GPU(s) visible" in out.stdout and "gpu tests: passed; smoke checks: passed" in out.stdout
    ran = [line for line in calls(venv) if " -m " in line]
    assert ran == ["python -m pytest -q -p no:cacheprovider -m gpu", "python -m benchmarks.gpu_smoke --windows 4"]


@pytest.mark.parametrize(("pytest_rc", "smoke_rc"), [(1, 0), (0, 1), (5, 0)])
def test_a_failed_gpu_test_or_smoke_check_fails_the_script_and_both_still_run(tmp_path, pytest_rc, smoke_rc):
    venv = fake_venv(tmp_path)
    out = run_script(venv, FAKE_CUDA_RC="0", FAKE_PYTEST_RC=str(pytest_rc), FAKE_SMOKE_RC=str(smoke_rc))
    assert out.returncode == 1
    assert any("benchmarks.gpu_smoke" in line for line in calls(venv))  # the smoke checks run after failed tests
    assert ("collected no gpu tests" in out.stderr) == (pytest_rc == 5)
    assert "FAILED (exit" in out.stdout


def test_without_a_set_up_venv_it_says_what_to_run(tmp_path):
    out = run_script(tmp_path / "no-venv")
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == f"gpu smoke: no Python in {tmp_path}/no-venv: run bash .ci/setup first (or set FRANKENLAB_VENV)"
    )
