"""Issue 25, cases 1-8 and 23: nothing escapes its folder, no session is overwritten without a word.

Every write goes through the one output-path guard (`pipeline.atomic`): no symlink is written
through, no `..` leaves the folder. Names printed to a terminal lose their control characters.
`frankenlab run` into a folder that holds a session refuses and names the ways on (replay,
--force, another folder); replay never writes into its source; a sweep folder is locked like a
run folder. A full disk during a stage save is one line, exit 2, and leaves no half-written folder.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frankenlab.pipeline.runlock import LOCK_FILE, RunFolderBusy, process_identity
from frankenlab.sessions import Session, load_session, record_run
from frankenlab.sessions.session import StageRecord
from frankenlab.tui.cli.main import main
from tests.test_runner import tiny_recipe

HOSTILE = "\x1b]0;pwned\x07evil\x1b[2J\nsecond line\rcarriage\x07bell"
DEPTH1 = '[[stages]]\nkind = "depth"\nk = 1\n'
DEPTH_DEPTH = DEPTH1 + '[[stages]]\nkind = "depth"\nk = 1\n'


def _dead_owner() -> dict:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return {**process_identity(), "pid": int(gone.stdout)}


def _stage(index: int, kind: str, status: str = "done", artifact: str | None = None) -> StageRecord:
    return StageRecord(
        index,
        kind,
        kind,
        {},
        status=status,
        artifact=artifact,
        metrics=[{"name": "perplexity", "value": 10.0 + index, "protocol": "p"}] if status == "done" else [],
    )


def _fake_stage_folder(run: Path, name: str) -> Path:
    d = run / "stages" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def _session_in(run: Path, recipe, *, status="done", stages=None, owner=None, name="") -> Session:
    s = Session(recipe=recipe.to_dict(), status=status, owner=owner, name=name)
    s.stages = stages if stages is not None else [_stage(0, "baseline")]
    run.mkdir(parents=True, exist_ok=True)
    s.save(run / "session.json")
    return s


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- the guard itself -------------------------------------------------------------------------------
def test_guard_refuses_dotdot_absolute_and_symlinks(tmp_path):
    from frankenlab.pipeline.atomic import UnsafeOutputPath, atomic_write_text, guarded_path, open_append

    root = tmp_path / "root"
    root.mkdir()
    assert guarded_path(root, "a", "b.json") == root / "a" / "b.json"
    for bad in ("../x", "a/../../x", "/etc/passwd", ".."):
        with pytest.raises(UnsafeOutputPath):
            guarded_path(root, bad)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (root / "link.txt").symlink_to(victim)
    with pytest.raises(UnsafeOutputPath, match="symbolic link"):
        atomic_write_text(root / "link.txt", "overwritten")
    with pytest.raises(UnsafeOutputPath, match="symbolic link"):
        open_append(root / "link.txt")
    (root / "sub").symlink_to(tmp_path, target_is_directory=True)  # a linked folder inside the root
    with pytest.raises(UnsafeOutputPath):
        guarded_path(root, "sub", "victim.txt")
    assert victim.read_text() == "precious"
    with open_append(root / "log.txt") as f:
        f.write("one\n")
    assert (root / "log.txt").read_text() == "one\n"


# -- 1: a hostile session id ------------------------------------------------------------------------
def test_1_save_with_a_hostile_id_stays_in_the_sessions_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    user = tmp_path / "deep" / "er" / "user-sessions"
    monkeypatch.setenv("FRANKENLAB_SESSIONS", str(user))
    s = _session_in(tmp_path / "run", tiny_recipe(tiny_model_dir, ""))
    data = json.loads((tmp_path / "run" / "session.json").read_text())
    data["id"] = "../../../../../escaped"
    (tmp_path / "run" / "session.json").write_text(json.dumps(data))
    assert s.id != data["id"]
    assert main(["sessions", "--save", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    written = [p for p in tmp_path.rglob("*.json") if p.parent != tmp_path / "run"]
    assert len(written) == 1 and written[0].parent == user, written
    assert ".." not in written[0].name and "/" not in written[0].name
    assert load_session(written[0]).id == "../../../../../escaped"  # the id itself is kept


# -- 2: symlinked recipe.toml / run.log in --out ---------------------------------------------------
@pytest.mark.parametrize("name", ["recipe.toml", "run.log"])
def test_2_symlinked_file_in_out_is_never_written_through(tiny_model_dir, tmp_path, data_dir, capsys, name):
    recipe_path, out = tmp_path / "r.toml", tmp_path / "out"
    tiny_recipe(tiny_model_dir, "").save(recipe_path)
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / name).symlink_to(victim)
    rc = main(["run", str(recipe_path), "--out", str(out), "--data-dir", str(data_dir), "--no-save-models"])
    text = _one_line(capsys.readouterr().out)
    assert victim.read_text() == "precious\n"
    assert rc == 2, text
    assert "symbolic link" in text and name in text and "Traceback" not in text


# -- 3: control characters in names ----------------------------------------------------------------
def test_3_control_characters_never_reach_the_terminal(tiny_model_dir, tmp_path, capsys):
    recipe = tiny_recipe(tiny_model_dir, "")
    recipe.name = HOSTILE
    _session_in(tmp_path / "runs" / "a", recipe, name=HOSTILE)
    _session_in(tmp_path / "runs" / "b", tiny_recipe(tiny_model_dir, ""))
    outputs = {}
    assert main(["sessions", str(tmp_path / "runs")]) == 0  # piped under capsys: tab-separated rows
    outputs["sessions"] = capsys.readouterr().out
    for fmt in ("table", "md", "csv"):
        assert main(["compare", str(tmp_path / "runs"), "--format", fmt]) == 0
        outputs[fmt] = capsys.readouterr().out
    for what, text in outputs.items():
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text, (what, text)
        assert "evil" in text, (what, text)
    rows = [r for r in outputs["sessions"].splitlines() if r]
    assert len(rows) == 3, rows  # a header and one row per session: the newline does not split one
    md_rows = [r for r in outputs["md"].splitlines() if r.startswith("|")]
    assert len(md_rows) == 4, md_rows  # header, rule, two sessions


def test_3_the_labs_session_list_strips_control_characters(tiny_model_dir, tmp_path):
    from frankenlab.sessions.store import list_sessions
    from frankenlab.tui.widgets.sessions_panel import session_label

    recipe = tiny_recipe(tiny_model_dir, "")
    recipe.name = HOSTILE
    _session_in(tmp_path / "runs" / "a", recipe)
    (entry,) = list_sessions([tmp_path / "runs"])
    label = session_label(entry).plain
    assert "evil" in label and not any(ord(c) < 32 or ord(c) == 127 for c in label), repr(label)


def test_3_printable_keeps_ordinary_text():
    from frankenlab.sessions.printable import printable

    assert printable("depth 2 + GPTQ (4-bit) — ü") == "depth 2 + GPTQ (4-bit) — ü"
    assert printable("a\x1b[2Jb\nc\td\x9be") == "a[2Jb c de"
    assert printable("\x1b]0;title\x07x") == "]0;titlex"


# -- 4 and 5: a run never replaces a session without a word ----------------------------------------
def test_4_run_into_a_finished_session_refuses_and_force_moves_it_aside(tiny_model_dir, tmp_path, data_dir, capsys):
    recipe_path, out = tmp_path / "r.toml", tmp_path / "out"
    recipe = tiny_recipe(tiny_model_dir, "")
    recipe.save(recipe_path)
    old = _session_in(out, recipe)
    (out / "recipe.toml").write_text("# the old recipe\n")
    (out / "run.log").write_text("old log\n")
    before = (out / "session.json").read_bytes()
    args = ["run", str(recipe_path), "--out", str(out), "--data-dir", str(data_dir), "--no-save-models"]
    assert main(args) == 2
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    flat = _one_line(text)
    assert "already holds a done session" in flat and "--force" in flat and "frankenlab replay" in flat, flat
    assert (out / "session.json").read_bytes() == before
    assert (out / "recipe.toml").read_text() == "# the old recipe\n" and (out / "run.log").read_text() == "old log\n"

    assert main(args + ["--force"]) == 0
    capsys.readouterr()
    (aside,) = list(out.glob("previous-*"))
    assert load_session(aside).id == old.id
    assert (aside / "recipe.toml").read_text() == "# the old recipe\n" and (
        aside / "run.log"
    ).read_text() == "old log\n"
    new = load_session(out)
    assert new.id != old.id and new.status == "done"


def test_5_run_into_an_interrupted_session_names_the_exact_replay_command(tiny_model_dir, tmp_path, capsys):
    recipe_path, out = tmp_path / "r.toml", tmp_path / "out"
    recipe = tiny_recipe(tiny_model_dir, DEPTH_DEPTH)
    recipe.save(recipe_path)
    stage1 = _fake_stage_folder(out, "01-depth")
    stages = [_stage(0, "baseline"), _stage(1, "depth", artifact=str(stage1)), _stage(2, "depth", "running")]
    _session_in(out, recipe, status="running", stages=stages, owner=_dead_owner())
    (out / LOCK_FILE).write_text(json.dumps(_dead_owner()))
    before = (out / "session.json").read_bytes()
    assert main(["run", str(recipe_path), "--out", str(out)]) == 2
    flat = _one_line(capsys.readouterr().out)
    assert "interrupted" in flat and f"frankenlab replay {out} --from-stage 2" in flat, flat
    assert (out / "session.json").read_bytes() == before
    assert stage1.is_dir() and (stage1 / "config.json").exists()


def test_4_a_session_that_cannot_resume_points_at_replay_from_the_start(tiny_model_dir, tmp_path, capsys):
    recipe_path, out = tmp_path / "r.toml", tmp_path / "out"
    recipe = tiny_recipe(tiny_model_dir, DEPTH_DEPTH)
    recipe.save(recipe_path)
    stages = [_stage(0, "baseline"), _stage(1, "depth", "failed")]
    _session_in(out, recipe, status="failed", stages=stages)
    assert main(["run", str(recipe_path), "--out", str(out)]) == 2
    flat = _one_line(capsys.readouterr().out)
    assert f"frankenlab replay {out} --from-stage 1" in flat, flat


def test_the_labs_fresh_run_folders_are_never_refused(tiny_model_dir, tmp_path):
    from frankenlab.sessions.store import claim_run_folder
    from frankenlab.tui.lab_state import LabState

    lab = LabState(loader=lambda *a, **k: None, runner=lambda *a, **k: None, runs_dir=tmp_path / "runs")
    first = lab.new_run_dir("tiny", stamp="20250101-000000")
    _session_in(first, tiny_recipe(tiny_model_dir, ""))
    second = lab.new_run_dir("tiny", stamp="20250101-000000")
    assert second != first
    claim_run_folder(second)  # nothing there: no refusal
    with pytest.raises(RunFolderBusy):
        claim_run_folder(first)


# -- 6: replay never writes into its source --------------------------------------------------------
@pytest.mark.parametrize("where", [".", "inside"])
def test_6_replay_into_its_own_source_is_refused(tiny_model_dir, tmp_path, capsys, where):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, DEPTH_DEPTH)
    stage1 = _fake_stage_folder(run, "01-depth")
    _session_in(run, recipe, stages=[_stage(0, "baseline"), _stage(1, "depth", artifact=str(stage1))])
    before = (run / "session.json").read_bytes()
    out = run if where == "." else run / "stages" / "again"
    assert main(["replay", str(run), "--from-stage", "2", "--out", str(out)]) == 2
    text = capsys.readouterr().out
    flat = _one_line(text)
    assert "cannot replay" in flat and "source" in flat and "--out" in flat, flat
    assert (run / "session.json").read_bytes() == before
    assert not (run / "stages" / "again").exists()


# -- 7: a sweep folder is locked -------------------------------------------------------------------
def test_7_a_second_sweep_into_a_live_sweep_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    from tests.test_sweep import GRID, sweep_text

    f, out = tmp_path / "s.toml", tmp_path / "sweep"
    f.write_text(sweep_text(tiny_model_dir, GRID))
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        from frankenlab.pipeline.runlock import process_start_time

        ident = {"pid": owner.pid, "host": process_identity()["host"], "started": process_start_time(owner.pid)}
        (out / LOCK_FILE).write_text(json.dumps(ident))
        assert main(["sweep", str(f), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        flat = _one_line(captured.out + captured.err)
        assert "in use by a live sweep" in flat and f"pid {owner.pid}" in flat, flat
        assert not (out / "sweep.json").exists() and not (out / "nodes").exists()
    finally:
        owner.kill()
        owner.wait()


def test_7_a_dead_sweeps_lock_is_taken_over_and_released(tiny_model_dir, tmp_path):
    from frankenlab.sessions.sweep import parse_sweep, run_sweep
    from tests.test_sweep import GRID, sweep_text

    out = tmp_path / "sweep"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps(_dead_owner()))
    sw = parse_sweep(sweep_text(tiny_model_dir, GRID))

    class Nothing:  # an executor that is never asked for a job: a sweep of zero configurations
        name = "none"

        def cancel(self):
            pass

        def close(self):
            pass

    seen = []
    record = run_sweep(sw, out, executor=Nothing(), configs=[], listener=seen.append)
    assert record["status"] == "done"
    assert not (out / LOCK_FILE).exists()
    assert any("took over the sweep folder" in getattr(e, "message", "") for e in seen), seen


# -- 8: a moved run folder -------------------------------------------------------------------------
def test_8_an_absolute_artifact_that_is_gone_is_found_beside_the_session(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, DEPTH_DEPTH)
    run = tmp_path / "moved" / "run"
    _fake_stage_folder(run, "01-depth")
    gone = tmp_path / "old-place" / "run" / "stages" / "01-depth"
    s = _session_in(run, recipe, stages=[_stage(0, "baseline"), _stage(1, "depth", artifact=str(gone))])
    assert s.artifact_path(1) == run / "stages" / "01-depth"


def test_8_replay_of_a_moved_run_records_paths_that_still_exist(tiny_model_dir, tmp_path, data_dir):
    from frankenlab.sessions import replay

    first = record_run(tiny_recipe(tiny_model_dir, DEPTH_DEPTH), tmp_path / "a" / "run", data_dir=data_dir)
    assert first.status == "done"
    (tmp_path / "a").rename(tmp_path / "b")  # the run folder moves
    moved = load_session(tmp_path / "b" / "run")
    assert not Path(moved.stages[1].artifact).exists()
    r1 = replay(moved, tmp_path / "r1", from_stage=2, data_dir=data_dir, save_models=True)
    assert r1.new.status == "done"
    assert Path(r1.new.stages[1].artifact).exists(), r1.new.stages[1].artifact
    again = load_session(r1.new.path)
    r2 = replay(again, tmp_path / "r2", from_stage=2, data_dir=data_dir, save_models=False)
    assert r2.new.status == "done"


# -- 23: a disk that fills during a stage save -------------------------------------------------------
def test_23_full_disk_during_a_stage_save_is_one_line_and_leaves_no_half_folder(
    tiny_model_dir, tmp_path, data_dir, capsys, monkeypatch
):
    import transformers

    recipe_path, out = tmp_path / "r.toml", tmp_path / "out"
    tiny_recipe(tiny_model_dir, DEPTH1).save(recipe_path)

    def full_disk(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    rc = main(["run", str(recipe_path), "--out", str(out), "--data-dir", str(data_dir)])
    text = capsys.readouterr().out
    assert rc == 2, text
    assert _one_line(text).count("the disk is full") == 1, text
    assert "Traceback" not in text
    assert not (out / "stages" / "01-depth").exists()
    s = load_session(out)
    assert s.status == "failed" and s.stages[0].status == "done" and s.stages[1].status == "failed"
    log = (out / "run.log").read_bytes() if (out / "run.log").exists() else b""
    # a rerun into the folder refuses (the failed session is kept), and touches neither file
    recipe_before, session_before = (out / "recipe.toml").read_bytes(), (out / "session.json").read_bytes()
    assert main(["run", str(recipe_path), "--out", str(out), "--data-dir", str(data_dir)]) == 2
    capsys.readouterr()
    assert (out / "recipe.toml").read_bytes() == recipe_before
    assert (out / "session.json").read_bytes() == session_before
    assert ((out / "run.log").read_bytes() if (out / "run.log").exists() else b"") == log
    assert not os.path.exists(out / "previous")


@pytest.mark.parametrize("fmt", ["table", "md"])
def test_2_compare_output_through_a_symlink_is_refused(tiny_model_dir, tmp_path, capsys, fmt):
    _session_in(tmp_path / "runs" / "a", tiny_recipe(tiny_model_dir, ""))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "table.txt").symlink_to(victim)
    rc = main(["compare", str(tmp_path / "runs"), "--format", fmt, "-o", str(tmp_path / "table.txt")])
    err = _one_line(capsys.readouterr().err)
    assert rc == 2 and "symbolic link" in err and "Traceback" not in err, err
    assert victim.read_text() == "precious\n"
    assert main(["compare", str(tmp_path / "runs"), "--format", fmt, "-o", str(tmp_path / "real.txt")]) == 0
    assert "tiny" in (tmp_path / "real.txt").read_text()
