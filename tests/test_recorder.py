"""The session is built from the runner's events alone, by a listener; the runner writes no session."""

from __future__ import annotations

import json
import subprocess
import sys

from frankenlab.pipeline import events as ev
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.runner import run_recipe
from frankenlab.sessions import SessionRecorder, StageRecord, load_session, record_run
from tests.test_runner import DEPTH_WIDTH, tiny_recipe

VOLATILE = ("id", "created", "updated", "events")


def comparable(session) -> dict:
    d = session.to_dict()
    for k in VOLATILE:
        d.pop(k)
    for st in d["stages"]:
        st.pop("seconds", None)
        st["report"].pop("stage_seconds", None)
    return d


def test_runner_alone_writes_no_session_and_events_rebuild_it(tiny_model_dir, tmp_path, data_dir):
    seen = []
    live = SessionRecorder(tmp_path / "live.json")
    result = run_recipe(
        tiny_recipe(tiny_model_dir, DEPTH_WIDTH), tmp_path / "run", listeners=[live, seen.append], data_dir=data_dir
    )
    assert result.status == "done" and len(result.records) == 3
    assert not (tmp_path / "run" / "session.json").exists()  # the runner only tells
    assert (tmp_path / "run" / "recipe.toml").is_file()
    offline = SessionRecorder(save=False)  # the same events, replayed later, make the same session
    for e in seen:
        offline(e)
    saved = load_session(tmp_path / "live.json")
    assert comparable(offline.session) == comparable(saved) == comparable(live.session)
    assert saved.status == "done" and [s.status for s in saved.stages] == ["done"] * 3
    assert saved.stages[2].footprint and saved.stages[2].artifact and saved.stages[1].metrics
    assert saved.model_source["weights"]["digest"]  # hashed by the recorder, not the runner
    finished = [e for e in seen if isinstance(e, ev.StageFinished)]
    assert finished[2].record == saved.stages[2] == result.records[2]  # the event carries the whole record
    assert isinstance(finished[2].record, StageRecord) and (finished[2].stage, finished[2].kind) == (2, "width")
    assert finished[2].record is not saved.stages[2], "the session keeps its own copy"
    logged = {e["event"] for e in saved.events}
    assert {"RunStarted", "ModelReady", "StageFinished", "RunFinished"} <= logged
    assert not any("record" in e or "recipe" in e for e in saved.events), "records are not logged twice"
    stage_log = [e for e in saved.events if e["event"] == "StageFinished"]
    assert [(e["stage"], e["kind"], e["status"]) for e in stage_log] == [
        (0, "baseline", "done"),
        (1, "depth", "done"),
        (2, "width", "done"),
    ]
    assert stage_log[2]["seconds"] == saved.stages[2].seconds
    assert Recipe.load(tmp_path / "run" / "recipe.toml").to_dict() == saved.recipe


def test_unwritable_run_folder_is_one_line(tiny_model_dir, tmp_path, data_dir):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    session = record_run(tiny_recipe(tiny_model_dir, DEPTH_WIDTH), out, data_dir=data_dir)
    assert session.status == "failed"
    assert session.stages[0].error.startswith(f"cannot write the run folder {out}")
    assert "--out" in session.stages[0].error and session.save_error
    recipe = tmp_path / "r.toml"
    tiny_recipe(tiny_model_dir, DEPTH_WIDTH).save(recipe)
    cli = subprocess.run(
        [sys.executable, "-m", "frankenlab.tui", "run", str(recipe), "--out", str(out), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stdout + cli.stderr
    assert "cannot write the run folder" in cli.stdout


def test_a_failing_save_does_not_stop_the_run(tiny_model_dir, tmp_path, data_dir):
    (tmp_path / "file").write_text("x")
    recorder = SessionRecorder(tmp_path / "file" / "session.json")  # every save fails
    result = run_recipe(
        tiny_recipe(tiny_model_dir, '[[stages]]\nkind = "depth"\nk = 1'),
        tmp_path / "run",
        listeners=[recorder],
        data_dir=data_dir,
    )
    assert result.status == "done"
    assert recorder.session.status == "done" and recorder.session.stages[1].metrics  # nothing measured is lost
    assert "could not be saved" in recorder.save_error
    recorder.session.save(tmp_path / "elsewhere.json")  # and it can still be saved somewhere else
    assert json.loads((tmp_path / "elsewhere.json").read_text())["status"] == "done"
