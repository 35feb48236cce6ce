"""Session files: round trip, atomic save under crashes, damaged files, listing, hashing.

No model is loaded here; replay on the tiny model is in test_sessions_replay.py, tables in
test_sessions_compare.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from frankenlab.pipeline.weight_hashes import weights_digest
from frankenlab.sessions import (
    Session,
    SessionError,
    StageRecord,
    list_sessions,
    load_session,
    save_to_user_dir,
    user_sessions_dir,
)
from frankenlab.sessions.schema import SESSION_SCHEMA, STAGE_SCHEMA, validate
from frankenlab.sessions.session import SCHEMA_VERSION, loads_session

ROOT = Path(__file__).resolve().parent.parent


def full_session() -> Session:
    """A session with every field set to something other than its default."""
    stages = [
        StageRecord(
            0,
            "baseline",
            "baseline",
            {},
            "done",
            [{"name": "perplexity", "value": 26.61, "protocol": "wikitext2-rows-512", "tokens": 1000}],
            params_count=1000,
            params_nonzero=1000,
            num_layers=8,
            footprint={"total_bytes": 4000},
            seconds=1.5,
            artifact=None,
            report={"note": "x"},
            details={"samples": ["a"]},
            error=None,
        ),
        StageRecord(
            1,
            "width",
            "prune",
            {"n": 1, "m": 8, "method": "wanda", "targets": ["q_proj"]},
            "failed",
            [
                {"name": "triviaqa_closed", "value": 0.25, "protocol": "triviaqa:first100", "exact_match": 0.2},
                {"name": "perplexity", "value": math.inf, "protocol": "wikitext2-concat-512"},
            ],
            params_count=900,
            params_nonzero=800,
            num_layers=6,
            footprint={"weights": {"bytes": 3}},
            seconds=2.25,
            artifact="stages/01-width",
            report={"density": 0.875, "nested": [1, [2, 3]]},
            details={"q": [{"ok": True}]},
            error="boom",
            reused_from="abc123",
            extra={"future_field": {"x": 1}},
        ),
    ]
    return Session(
        recipe={"name": "r", "model": {"source": "default"}, "stages": [{"kind": "width", "pattern": "1:8"}]},
        model_source={
            "ref": "default",
            "kind": "default",
            "path": "/m",
            "name": "Smol",
            "weights": {"algorithm": "sha256", "digest": "ab" * 32, "files": ["model.safetensors"], "bytes": 10},
        },
        environment={"torch": "2.13", "device": "cpu", "dtype": "float32", "seed": 3, "threads": 2},
        stages=stages,
        events=[{"event": "LogLine", "stage": -1, "time": 1.0, "message": "hi", "level": "info"}],
        status="failed",
        id="0123456789ab",
        name="my run",
        created=100.0,
        updated=200.0,
        schema_version=SCHEMA_VERSION,
        writer={"program": "frankenlab", "version": "9.9"},
        replay_of={"session_id": "fedcba987654", "path": "/x/session.json", "from_stage": 2},
        owner={"pid": 4242, "host": "lab-box", "started": 99.5},
        extra={"comment": "kept"},
    )


def test_every_field_is_exercised():
    s = full_session()
    for f in dataclasses.fields(Session):
        if f.name in ("path", "save_error", "schema_version", "updated"):  # not serialized
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        )
        assert getattr(s, f.name) != default, f"full_session() leaves Session.{f.name} at its default"
    for f in dataclasses.fields(StageRecord):
        values = [getattr(st, f.name) for st in s.stages]
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        )
        assert any(v != default for v in values), f"no stage sets StageRecord.{f.name}"


def test_round_trip_every_field(tmp_path):
    s = full_session()
    p = s.save(tmp_path / "session.json")
    assert s.path == str(p)
    loaded = load_session(p)
    assert loaded.path == str(p)
    a, b = s.to_dict(), loaded.to_dict()
    b["updated"] = a["updated"]
    assert a == b
    for f in dataclasses.fields(Session):
        if f.name not in ("path", "stages", "updated"):
            assert getattr(loaded, f.name) == getattr(s, f.name), f.name
    for x, y in zip(s.stages, loaded.stages, strict=False):
        assert x == y
    assert loaded.stages[1].metric("perplexity")["value"] == math.inf
    assert loaded.stages[1].extra == {"future_field": {"x": 1}}
    assert loaded.extra == {"comment": "kept"}
    data = json.loads(p.read_text())
    assert data["format"] == "frankenlab-session" and data["schema_version"] == SCHEMA_VERSION
    assert data["comment"] == "kept" and data["stages"][1]["future_field"] == {"x": 1}
    assert "path" not in data and "extra" not in data
    # saving the loaded copy writes the same document again
    loaded.save(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    again["updated"] = data["updated"]
    assert again == data


def test_save_accepts_odd_values_and_folders(tmp_path):
    s = Session(
        recipe={"name": "x"}, stages=[StageRecord(0, "baseline", report={"p": Path("/a"), "t": (1, 2), 3: "int key"})]
    )
    p = s.save(tmp_path)  # a folder gets session.json
    assert p == tmp_path / "session.json"
    st = load_session(tmp_path).stages[0]
    assert st.report == {"p": "/a", "t": [1, 2], "3": "int key"}


def test_runner_era_file_without_format_marker_loads(tmp_path):
    d = full_session().to_dict()
    d.pop("format")
    (tmp_path / "session.json").write_text(json.dumps(d))
    assert load_session(tmp_path).id == "0123456789ab"


# -- atomic save -------------------------------------------------------------------------------------
def test_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    s = full_session()
    p = s.save(tmp_path / "session.json")
    before = p.read_text()
    s.status = "done"

    def crash(*a, **k):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        s.save(p)
    monkeypatch.undo()
    assert p.read_text() == before
    assert load_session(p).status == "failed"
    assert [f.name for f in tmp_path.iterdir()] == ["session.json"], "temporary file left behind"


def test_crash_in_the_middle_of_writing_keeps_the_previous_file(tmp_path, monkeypatch):
    s = full_session()
    p = s.save(tmp_path / "session.json")
    before = p.read_text()
    real_fsync = os.fsync

    def die(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C between write and fsync

    monkeypatch.setattr(os, "fsync", die)
    s.name = "changed"
    with pytest.raises(KeyboardInterrupt):
        s.save(p)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert p.read_text() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_kill_9_during_saves_leaves_a_valid_session(tmp_path):
    """A process saving a growing session in a loop is SIGKILLed; the file must still load."""
    target = tmp_path / "run" / "session.json"
    script = textwrap.dedent(f"""
        from frankenlab.sessions.session import Session, StageRecord
        s = Session(recipe={{"name": "loop"}})
        i = 0
        while True:
            i += 1
            s.stages.append(StageRecord(i, "depth", details={{"blob": "x" * 20000}}))
            s.save({str(target)!r})
            if i == 3:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    s = load_session(target)
    assert len(s.stages) >= 3 and s.recipe == {"name": "loop"}
    # a left-over temporary file is never taken for a session
    assert [e.path.name for e in list_sessions([tmp_path])] == ["session.json"]


# -- damaged files -----------------------------------------------------------------------------------
def _write(tmp_path, content: bytes | str, name="session.json") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def _message(path) -> str:
    with pytest.raises(SessionError) as info:
        load_session(path)
    return str(info.value)


def test_truncated_file_at_every_point_gives_a_message(tmp_path):
    text = full_session().dumps()
    step = max(1, len(text) // 150)
    for cut in list(range(0, len(text) - 1, step)) + [len(text) - 1]:
        msg = _message(_write(tmp_path, text[:cut]))
        assert str(tmp_path) in msg
        assert "truncated" in msg or (cut == 0 and "empty" in msg), msg


def test_truncated_message_says_truncated(tmp_path):
    text = full_session().dumps()
    assert "truncated" in _message(_write(tmp_path, text[: len(text) // 2]))


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"\x80\x81\xfe\xff garbage", "not a text file"),
        (pickle.dumps({"recipe": {}}), "not"),
        ('{"a": 1,, }', "corrupted"),
        ("[1, 2, 3]", "expected an object, got list"),
        ('{"hello": "world"}', "not a frankenlab session"),
        ('{"format": "something-else", "schema_version": 1}', "not a frankenlab session"),
        ('{"format": "frankenlab-session", "schema_version": 99, "recipe": {}, "stages": []}', "newer frankenlab"),
        ('{"format": "frankenlab-session", "schema_version": 0, "recipe": {}, "stages": []}', "does not exist"),
        ('{"format": "frankenlab-session", "schema_version": "1", "recipe": {}, "stages": []}', "whole number"),
        ('{"format": "frankenlab-session", "schema_version": 1, "stages": []}', "missing 'recipe'"),
        ('{"format": "frankenlab-session", "schema_version": 1, "recipe": {}, "stages": {}}', "stages: expected array"),
        (
            '{"format": "frankenlab-session", "schema_version": 1, "recipe": {}, "status": "bogus", "stages": []}',
            "status: must be one of",
        ),
        (
            '{"format": "frankenlab-session", "schema_version": 1, "recipe": {}, "stages": [{"index": 0, "kind": "b", '
            '"status": "done", "metrics": [{"name": "perplexity", "value": "abc"}]}]}',
            "stages[0].metrics[0].value",
        ),
        (
            '{"format": "frankenlab-session", "schema_version": 1, "recipe": {}, "stages": [{"index": true, "kind": "b", '
            '"status": "done"}]}',
            "stages[0].index: expected integer",
        ),
        (
            '{"format": "frankenlab-session", "schema_version": 1, "recipe": {}, "stages": [{"kind": "b"}]}',
            "missing 'index'",
        ),
        (
            '{"format": "frankenlab-session", "schema_version": 1, "recipe": {"stages": "x"}, "stages": []}',
            "recipe.stages",
        ),
        pytest.param("[" * 100000, "nested too deeply", id="deeply-nested"),
    ],
)
def test_damaged_files_give_clear_messages(tmp_path, content, words):
    msg = _message(_write(tmp_path, content))
    assert words in msg, msg
    assert "Traceback" not in msg


def test_newer_version_names_both_versions(tmp_path):
    d = full_session().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    msg = _message(_write(tmp_path, json.dumps(d)))
    assert f"version {SCHEMA_VERSION + 1}" in msg and f"up to {SCHEMA_VERSION}" in msg and "Upgrade" in msg


def test_missing_paths(tmp_path):
    assert "no such session file" in _message(tmp_path / "nope.json")
    assert "holds no session.json" in _message(tmp_path)


def test_loading_never_executes_code(tmp_path, monkeypatch):
    """Python-looking payloads stay strings; no import or eval happens."""
    d = full_session().to_dict()
    d["recipe"]["name"] = "__import__('os').system('touch pwned')"
    d["stages"][0]["report"] = {"__class__": "os.system", "py/object": "subprocess.Popen", "!!python/object": 1}
    s = loads_session(json.dumps(d))
    assert s.recipe["name"].startswith("__import__")
    assert s.stages[0].report["py/object"] == "subprocess.Popen"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_schema_doc_names_every_field():
    doc = (ROOT / "sessions" / "SCHEMA.md").read_text()
    for name in list(SESSION_SCHEMA["properties"]) + list(STAGE_SCHEMA["properties"]):
        assert f"`{name}`" in doc, f"sessions/SCHEMA.md does not document {name}"
    assert f"version {SCHEMA_VERSION}" in doc.lower() or f"version: {SCHEMA_VERSION}" in doc.lower()


def test_validator_accepts_what_save_writes():
    assert validate(full_session().to_dict(), SESSION_SCHEMA) == []
    assert validate(Session(recipe={}).to_dict(), SESSION_SCHEMA) == []


# -- where sessions live -----------------------------------------------------------------------------
def test_user_sessions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FRANKENLAB_SESSIONS", str(tmp_path / "mine"))
    assert user_sessions_dir() == tmp_path / "mine"
    monkeypatch.delenv("FRANKENLAB_SESSIONS")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert user_sessions_dir() == tmp_path / "xdg" / "frankenlab" / "sessions"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_sessions_dir() == tmp_path / "home" / ".local" / "share" / "frankenlab" / "sessions"


def test_list_sessions_finds_runs_and_saved_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRANKENLAB_SESSIONS", str(tmp_path / "saved"))
    old = Session(recipe={"name": "old"}, created=1.0)
    old.save(tmp_path / "runs" / "old-1" / "session.json")
    new = Session(recipe={"name": "new"}, created=2.0)
    new.save(tmp_path / "runs" / "new-1" / "session.json")
    mine = Session(recipe={"name": "mine"}, created=3.0)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "notes.json").write_text('{"not": "a session"}')  # ignored: not a session
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "session.json").write_text('{"format": "frankenlab-session", "sch')
    (tmp_path / "runs" / "new-1" / "session.json.abc.tmp").write_text("{")  # an interrupted save
    path = save_to_user_dir(mine, "My Session!")
    assert path.parent == tmp_path / "saved" and path.name == f"My-Session-{mine.id}.json"
    entries = list_sessions()
    names = [e.session.title if e.session else "BROKEN" for e in entries]
    assert [n for n in names if n != "BROKEN"] == ["My Session!", "new", "old"]  # newest first
    assert names.count("BROKEN") == 1 and len(entries) == 4
    broken = next(e for e in entries if e.session is None)
    assert "truncated" in broken.error


def test_save_to_user_dir_makes_artifacts_absolute(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "stages" / "01-depth").mkdir(parents=True)
    (run / "stages" / "01-depth" / "config.json").write_text("{}")
    s = Session(
        recipe={"name": "r"},
        stages=[StageRecord(0, "baseline"), StageRecord(1, "depth", artifact="runs/r/stages/01-depth")],
    )
    s.save(run / "session.json")
    moved = load_session(run)
    assert moved.artifact_path(1) == run / "stages" / "01-depth"  # found beside the session file
    path = save_to_user_dir(moved, folder=tmp_path / "user")
    copy = load_session(path)
    assert Path(copy.stages[1].artifact).is_absolute()
    assert copy.artifact_path(1).resolve() == (run / "stages" / "01-depth").resolve()


# -- weights hash ------------------------------------------------------------------------------------
def test_weights_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("FRANKENLAB_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "model"
    m.mkdir()
    (m / "model.safetensors").write_bytes(b"weights" * 1000)
    (m / "config.json").write_text("{}")
    a = weights_digest(m)
    assert a["algorithm"] == "sha256" and a["files"] == ["model.safetensors"] and a["bytes"] == 7000
    assert weights_digest(m) == a
    assert (tmp_path / "cache" / "weight-hashes.json").exists()
    (m / "model.safetensors").write_bytes(b"weightz" * 1000)
    assert weights_digest(m)["digest"] != a["digest"]
    assert weights_digest(tmp_path / "empty") is None
    # Hugging Face cache: the blob's name is its sha256, used without reading the file
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / ("c" * 64)
    blob.write_bytes(b"x")
    snap = tmp_path / "hub" / "snap"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blob)
    assert weights_digest(snap)["files"] == ["model.safetensors"]


def test_core_imports_no_textual_and_no_torch():
    code = (
        "import sys, frankenlab.sessions, frankenlab.sessions.replay, frankenlab.sessions.compare, "
        "frankenlab.sessions.store, frankenlab.pipeline.weight_hashes; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'torch')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_version_1_wanda_stages_keep_the_statistics_they_ran_with():
    from frankenlab.pipeline.recipe import Recipe

    d = full_session().to_dict()
    d["schema_version"] = 1
    d["recipe"]["stages"] = [
        {"kind": "width", "pattern": "2:4"},
        {"kind": "width", "pattern": "1:8", "method": "magnitude"},
    ]
    d["stages"][1]["kind"] = "width"
    d["stages"][1]["params"] = {"pattern": "2:4"}
    s = loads_session(json.dumps(d))
    assert s.schema_version == SCHEMA_VERSION
    assert s.recipe["stages"][0]["sequential"] == "layer"  # what version 1 ran
    assert "sequential" not in s.recipe["stages"][1]  # magnitude pruning has no statistics
    assert s.stages[1].params["sequential"] == "layer"
    assert Recipe.from_dict(s.recipe).stages[0].config.sequential == "layer"
    current = full_session().to_dict()  # a current session without the key means today's default
    assert "sequential" not in loads_session(json.dumps(current)).recipe["stages"][0]
