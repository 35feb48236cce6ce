"""Issue 14, runs and sessions: a run never lies about its state, and no input writes where it should not.

Kills and signals are real: a `frankenlab run` child process (tests/run_child.py) is held at the
start of stage 2, then killed with SIGKILL or sent SIGTERM.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frankenlab.pipeline.runlock import LOCK_FILE, RunFolderBusy, RunLock, owner_alive, process_identity, safe_slug
from frankenlab.sessions import load_session, record_run
from tests.test_runner import DEPTH_WIDTH, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)


# -- path traversal ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../../elsewhere/x", "/etc/x", "..", "a/../../b", ".hidden", "-rf", ""])
def test_names_become_one_safe_folder_name(name):
    slug = safe_slug(name)
    assert slug and "/" not in slug and ".." not in slug and not slug.startswith((".", "-"))


def test_default_folders_stay_under_runs(tmp_path):
    from frankenlab.tui.cli.run import default_out
    from frankenlab.tui.lab_state import LabState

    for name in ("../../../../elsewhere/x", "/etc/x"):
        for out in (default_out(name), default_out(name, "-replay")):
            assert out.parts[0] == "runs" and len(out.parts) == 2, out
        lab = LabState(loader=lambda *a, **k: None, runner=lambda *a, **k: None, runs_dir=tmp_path / "runs")
        d = lab.new_run_dir(name)
        assert d.parent == tmp_path / "runs", d


def test_cli_run_without_out_never_escapes(tiny_model_dir, tmp_path, data_dir):
    recipe = tiny_recipe(tiny_model_dir, "")
    text = recipe.dumps().replace('name = "tiny"', 'name = "../../../../elsewhere/x"')
    (tmp_path / "work").mkdir()
    (tmp_path / "r.toml").write_text(text)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "frankenlab.tui",
            "run",
            str(tmp_path / "r.toml"),
            "--data-dir",
            str(data_dir),
            "--no-save-models",
        ],
        cwd=tmp_path / "work",
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    made = list((tmp_path / "work" / "runs").iterdir())
    assert len(made) == 1 and made[0].name.startswith("elsewhere-x-")
    assert not (tmp_path / "elsewhere").exists() and not Path("/elsewhere").exists()
    assert load_session(made[0]).recipe["name"] == "../../../../elsewhere/x"  # the name itself is kept


# -- owner, interrupted, lock ----------------------------------------------------------------------
def _child(mode, marker, recipe_path, out, data_dir):
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "run_child.py"),
            mode,
            str(marker),
            "--",
            "run",
            str(recipe_path),
            "--out",
            str(out),
            "--data-dir",
            str(data_dir),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen):
    while not path.exists():  # the child writes it once stage 1 is saved and stage 2 has started
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before stage 2: {proc.stdout.read()}")
        time.sleep(0.1)


def test_kill_9_reads_interrupted_lock_refuses_then_taken_over_and_replay_resumes(tiny_model_dir, tmp_path, data_dir):
    recipe_path, out = tmp_path / "r.toml", tmp_path / "run"
    tiny_recipe(tiny_model_dir, DEPTH_WIDTH).save(recipe_path)
    proc = _child("hang", tmp_path / "marker", recipe_path, out, data_dir)
    try:
        _wait_for(tmp_path / "marker", proc)
        live = load_session(out)
        assert live.status == "running" and live.owner["pid"] == proc.pid  # alive: really running
        # a second run into the same folder is refused while the first lives
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "frankenlab.tui",
                "run",
                str(recipe_path),
                "--out",
                str(out),
                "--data-dir",
                str(data_dir),
            ],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert "in use by a live run" in second.stdout and f"pid {proc.pid}" in second.stdout
        assert "Traceback" not in second.stdout + second.stderr
        assert load_session(out).id == live.id  # nothing of the live run was overwritten
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dead = load_session(out)
    assert dead.status == "interrupted"
    assert dead.stages[1].status == "done" and dead.stages[2].status == "interrupted"
    assert "ended without finishing" in dead.stages[2].error
    assert json.loads((out / "session.json").read_text())["status"] == "running"  # the file is not rewritten
    listing = subprocess.run(
        [sys.executable, "-m", "frankenlab.tui", "sessions", str(tmp_path), "--format", "json"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert json.loads(listing.stdout)[0]["status"] == "interrupted"
    # replay --from-stage 2 resumes after the last finished stage
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "frankenlab.tui",
            "replay",
            str(out),
            "--from-stage",
            "2",
            "--out",
            str(tmp_path / "resumed"),
            "--data-dir",
            str(data_dir),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert "Traceback" not in resumed.stdout + resumed.stderr, resumed.stdout + resumed.stderr
    new = load_session(tmp_path / "resumed")
    assert new.status == "done" and new.stages[2].status == "done" and new.stages[1].reused_from == dead.id
    # the stale lock of the killed run is taken over, with a message
    assert (out / LOCK_FILE).exists()
    again = record_run(tiny_recipe(tiny_model_dir, ""), out, data_dir=data_dir, save_models=False)
    assert again.status == "done"
    assert any(
        "took over the run folder" in e.get("message", "") and f"pid {proc.pid}" in e.get("message", "")
        for e in again.events
    )
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_sigterm_cancels_like_ctrl_c_and_keeps_finished_stages(tiny_model_dir, tmp_path, data_dir):
    recipe_path, out = tmp_path / "r.toml", tmp_path / "run"
    tiny_recipe(tiny_model_dir, DEPTH_WIDTH).save(recipe_path)
    proc = _child("wait-cancel", tmp_path / "marker", recipe_path, out, data_dir)
    try:
        _wait_for(tmp_path / "marker", proc)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate()
    finally:
        proc.kill()  # a no-op once it has exited; a child left hanging (pytest-timeout) does not outlive the test
    assert proc.returncode == 143, text  # 128 + SIGTERM, as job queues expect (Ctrl-C: 130)
    assert "cancelled by SIGTERM" in text and "Traceback" not in text
    s = load_session(out)
    assert s.status == "cancelled" and s.stages[1].status == "done" and s.stages[2].status == "cancelled"
    assert not (out / LOCK_FILE).exists()


def test_owner_of_a_dead_process_is_gone_and_of_this_one_alive():
    me = process_identity()
    assert owner_alive(me) is True
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_alive({**me, "pid": int(gone.stdout)}) is False
    assert owner_alive({**me, "started": me["started"] - 3600}) is False  # a reused pid is not the owner
    assert owner_alive({**me, "host": "another-machine"}) is None


def test_lock_refuses_a_second_run_of_the_same_folder_in_one_process(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunFolderBusy, match="already in use"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_cancel_before_any_stage_says_so(tiny_model_dir, tmp_path, data_dir):
    import threading

    cancel = threading.Event()
    cancel.set()
    s = record_run(tiny_recipe(tiny_model_dir, DEPTH_WIDTH), tmp_path / "o", data_dir=data_dir, cancel=cancel)
    assert s.status == "cancelled"
    assert "no stage had finished" in s.stages[0].error


# -- faults: full disk, corrupt model files ----------------------------------------------------------
def test_full_disk_during_a_save_keeps_the_previous_session(tiny_model_dir, tmp_path, data_dir, monkeypatch):
    import frankenlab.pipeline.atomic as files

    out = tmp_path / "o"
    first = record_run(tiny_recipe(tiny_model_dir, ""), out, data_dir=data_dir, save_models=False)
    before = (out / "session.json").read_text()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "_fsync_file", full)
    first.name = "renamed"
    with pytest.raises(OSError):
        first.save(out / "session.json")
    assert (out / "session.json").read_text() == before
    assert not list(out.glob("*.tmp"))
    second = record_run(tiny_recipe(tiny_model_dir, ""), tmp_path / "o2", data_dir=data_dir, save_models=False)
    assert "could not be saved" in second.save_error and "No space left" in second.save_error


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF\x03\x00\x00\x00" + b"\x00" * 40])
def test_corrupt_or_truncated_gguf_is_one_line_exit_2(tmp_path, content):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    out = subprocess.run(
        [sys.executable, "-m", "frankenlab.tui", "run", "depth2", "--model", str(bad), "--out", str(tmp_path / "o")],
        env={**ENV, "FRANKENLAB_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
    )
    text = " ".join((out.stdout + out.stderr).split())  # the console wraps long lines
    assert out.returncode == 2, text
    assert "Traceback" not in text and "not a readable GGUF model" in text and "corrupt or truncated" in text, text
