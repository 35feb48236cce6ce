"""`benchmarks/gpu_smoke.sh`: the environment report, then (with a CUDA device) the gpu tests and the
smoke checks, its exit status failing when either failed; on a CPU machine (and with --dry-run) it
prints every check it runs, their recipe and sweep built, and passes. The GPU path runs against a
stand-in venv whose python only pretends (as tests/test_ci_setup.py's); `benchmarks.gpu_smoke.main`
runs with its checks stood in, so a part it stops running fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


# what issue 29 asks the smoke run to do, written out here (not read from the script) so a part dropped
# from the script fails this test
REQUIRED_PARTS = [
    'load: the model loads in dtype "auto" on the GPU',
    "fp32 vs bf16: perplexity in fp32 and in the GPU's 16-bit dtype on the same windows",
    "recipe: depth -> width 2:4 -> LoRA -> GPTQ -> EoRA, evaluated after every stage",
    "gptq report:",
    "quantized chat: the quantized folders on the GPU: counts, forwards, time to the first chat token",
    "two-GPU sweep: a local sweep with one process per GPU, two jobs at once (skipped with one GPU)",
    "ray fail-fast: a Ray instance without GPUs refuses a CUDA job at once",
]


def test_on_a_cpu_machine_it_reports_the_environment_and_every_check_it_runs_and_passes():
    venv = Path(sys.executable).parent.parent  # the real venv; conftest hides GPUs (CUDA_VISIBLE_DEVICES="")
    out = run_script(venv, "--lora-steps", "3", CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== environment" in out.stdout and "torch 2." in out.stdout and "gptqmodel 7.6.0" in out.stdout
    assert out.stdout.rstrip().endswith("no CUDA device: nothing to check")
    parts = [line.split(". ", 1)[1] for line in out.stdout.splitlines() if line[:1].isdigit() and ". " in line]
    assert len(parts) == len(REQUIRED_PARTS)
    for want, got in zip(REQUIRED_PARTS, parts, strict=True):
        assert got.startswith(want)
    # the recipe and the sweep were built (a recipe the checks could not run fails here)
    assert "recipe: depth -> width 2:4 -> lora 3 steps -> gptq -> eora; evaluation after each stage" in out.stdout
    assert "sweep: gpu-smoke, axes width.pattern = ['2:4', '4:8']" in out.stdout
    assert "tests collected" in out.stdout and " passed" not in out.stdout  # counted, never run here


def test_a_dry_run_on_a_gpu_machine_runs_nothing(tmp_path):
    venv = fake_venv(tmp_path)
    out = run_script(venv, "--windows", "4", "--dry-run", FAKE_CUDA_RC="0")
    assert out.returncode == 0, out.stdout + out.stderr
    ran = [line for line in calls(venv) if " -m " in line]
    assert ran == [
        "python -m benchmarks.gpu_smoke --windows 4 --dry-run",
        "python -m pytest -q -p no:cacheprovider -m gpu --collect-only",
    ]
    assert "no CUDA device" not in out.stdout


@pytest.mark.parametrize(("smoke_rc", "pytest_rc"), [(1, 0), (0, 5)])
def test_a_plan_that_cannot_be_built_or_no_gpu_tests_fail_the_cpu_run(tmp_path, smoke_rc, pytest_rc):
    venv = fake_venv(tmp_path)
    out = run_script(venv, FAKE_CUDA_RC="1", FAKE_SMOKE_RC=str(smoke_rc), FAKE_PYTEST_RC=str(pytest_rc))
    assert out.returncode == 1
    assert ("collected no gpu tests" in out.stderr) == (pytest_rc == 5)


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


# -- benchmarks.gpu_smoke.main with its checks stood in ---------------------------------------------------
def stand_in_checks(monkeypatch, gpus: int, failing: str = ""):
    """CUDA with `gpus` H100s, and every heavy check recorded instead of run (`failing` raises)."""
    import benchmarks.gpu_smoke as smoke

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    ran = []

    def stand_in(name, value):
        def fn(*args, **kw):
            ran.append(name if name != "reopened" else f"reopened {args[1]}")
            if name == failing:
                raise RuntimeError(f"{name} broke")
            if name == "recipe":
                args[2].update(session="session", final="eora-folder")
            return value

        return fn

    monkeypatch.setattr(smoke, "_load", stand_in("load", SimpleNamespace(dtype=torch.bfloat16)))
    monkeypatch.setattr(smoke, "_fp32_vs_half", stand_in("fp32 vs half", "fp32 1, bf16 1"))
    monkeypatch.setattr(smoke, "_recipe", stand_in("recipe", "ppl"))
    monkeypatch.setattr(smoke, "_gptq_report", stand_in("gptq report", "kernel torch"))
    monkeypatch.setattr(smoke, "_gptq_reopened", stand_in("reopened", "counts = checkpoint"))
    monkeypatch.setattr(smoke, "_first_chat_token", stand_in("first chat token", "0.1 s"))
    if gpus >= 2:
        monkeypatch.setattr(smoke, "_sweep", stand_in("sweep", "2 GPUs"))
    monkeypatch.setattr(smoke, "_ray_fail_fast", stand_in("ray fail-fast", "refused"))
    return smoke, ran


def test_every_part_runs_in_order_on_a_machine_with_two_gpus(monkeypatch, tmp_path, capsys):
    smoke, ran = stand_in_checks(monkeypatch, gpus=2)
    assert smoke.main(["--out", str(tmp_path)]) == 0
    assert ran == [
        "load",
        "fp32 vs half",
        "recipe",
        "gptq report",
        "reopened torch",
        "reopened marlin",
        "first chat token",
        "sweep",
        "ray fail-fast",
    ]
    assert "9 of 9 checks passed" in capsys.readouterr().out


def test_with_one_gpu_the_sweep_is_skipped_with_a_line_and_a_failure_fails_the_run(monkeypatch, tmp_path, capsys):
    smoke, ran = stand_in_checks(monkeypatch, gpus=1)
    assert smoke.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1 GPU here, the two-GPU sweep needs 2 or more" in out and "8 of 9 checks passed, 1 skipped" in out
    smoke, ran = stand_in_checks(monkeypatch, gpus=1, failing="recipe")
    assert smoke.main(["--out", str(tmp_path)]) == 1
    assert "gptq report" not in ran and ran[-1] == "ray fail-fast"  # the checks after a failed one still run


@pytest.mark.slow
def test_the_ray_check_refuses_cuda_on_a_real_instance_without_gpus():
    """The smoke's Ray check itself, on this CPU machine (a real local Ray instance, no GPU)."""
    from benchmarks.gpu_smoke import _ray_fail_fast

    line = _ray_fail_fast()
    assert line.startswith("refused in ") and "has no GPU" in line
