"""Replay on the tiny model: same numbers come back, an edited saved number is flagged,
--from-stage resumes from the saved intermediate model, a cancel leaves a valid session."""

from __future__ import annotations

import json
import threading

import pytest

from frankenlab.pipeline import events as ev
from frankenlab.pipeline.recipe import Recipe
from frankenlab.sessions import Session, SessionError, StageRecord, compare_sessions, load_session, record_run, replay
from frankenlab.sessions.replay import resume_problem
from frankenlab.tui.cli.main import main


def tiny_recipe(model_dir) -> Recipe:
    return Recipe.loads(f"""
name = "tiny-dw"
[model]
source = "{model_dir}"
device = "cpu"
dtype = "float32"
[calibration]
samples = 8
seq_len = 64
[evaluation]
ppl_limit = 4
perplexity = ["wikitext2-concat-128"]
samples = false
[[stages]]
kind = "depth"
k = 2
[[stages]]
kind = "width"
pattern = "1:8"
""")


@pytest.fixture(scope="module")
def original(tiny_model_dir, data_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRANKENLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("original") / "run"
        session = record_run(tiny_recipe(tiny_model_dir), out, data_dir=data_dir)
        assert session.status == "done", [s.error for s in session.stages]
        yield load_session(out)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FRANKENLAB_CACHE", str(tmp_path / "cache"))


def test_session_of_a_run_has_hash_environment_and_artifacts(original):
    w = original.model_source["weights"]
    assert w["algorithm"] == "sha256" and len(w["digest"]) == 64 and w["files"] == ["model.safetensors"]
    env = original.environment
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["seed"] == 0 and env["threads"] >= 1
    assert env["torch"] and env["transformers"]
    assert [s.status for s in original.stages] == ["done"] * 3
    assert all(original.artifact_path(i) is not None for i in (1, 2))
    assert original.stages[2].metric("perplexity")["protocol"] == "wikitext2-concat-128:first4"


def test_replay_detects_a_changed_metric(original, data_dir, tmp_path, capsys):
    edited = load_session(original.path)
    ppl = edited.stages[2].metric("perplexity")
    ppl["value"] *= 1.10  # pretend the saved run measured 10 % more
    edited_path = edited.save(tmp_path / "edited" / "session.json")
    out = tmp_path / "replayed"
    rc = main(["replay", str(edited_path), "--out", str(out), "--data-dir", str(data_dir), "--no-save-models"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "CHANGED" in printed and "differ beyond 1 %" in printed
    assert "same model weights" in printed
    new = load_session(out)
    assert new.replay_of == {"session_id": edited.id, "path": str(edited_path), "from_stage": 1}
    diffs = compare_sessions(edited, new, 0.01)
    flagged = [(d.stage, d.name) for d in diffs if d.flagged]
    assert flagged == [(2, "perplexity")]
    d = next(d for d in diffs if d.flagged)
    assert d.relative == pytest.approx(1 / 1.10 - 1, rel=1e-6) and d.status == "changed"
    # against the untouched original, every number is back: baseline, both stages, and the counts
    same = compare_sessions(original, new, 0.01)
    assert same and not [d for d in same if d.flagged]
    assert {(d.stage, d.name) for d in same} >= {
        (0, "perplexity"),
        (1, "perplexity"),
        (2, "perplexity"),
        (2, "nonzero params"),
    }


def test_replay_from_stage_resumes_from_the_saved_model(original, data_dir, tmp_path):
    seen = []
    result = replay(
        original, tmp_path / "resumed", from_stage=2, data_dir=data_dir, save_models=False, on_diff=seen.append
    )
    assert result.ok, [(d.stage, d.name, d.saved, d.new) for d in result.flagged]
    assert {d.stage for d in result.diffs} == {2}
    assert [(d.stage, d.name, d.status) for d in seen] == [(2, "perplexity", "ok")]
    new = load_session(tmp_path / "resumed")
    assert new.replay_of["from_stage"] == 2
    assert [s.reused_from for s in new.stages] == [original.id, original.id, None]
    assert new.stages[1].metric("perplexity") == original.stages[1].metric("perplexity")
    assert new.stages[2].status == "done" and new.stages[2].num_layers == 6  # ran on the depth-pruned model
    assert new.model_source["path"] == str(original.artifact_path(1).resolve())


def test_replay_refuses_what_it_cannot_do(original, tmp_path, capsys):
    with pytest.raises(SessionError, match="between 1 and 2"):
        replay(original, tmp_path / "x", from_stage=3)
    with pytest.raises(SessionError, match="between 1 and 2"):
        replay(original, tmp_path / "x", from_stage=0)
    no_models = load_session(original.path)
    no_models.stages[1].artifact = None
    with pytest.raises(SessionError, match=r"saved no model after stage 1.*--from-stage 1 \(from the start\)"):
        replay(no_models, tmp_path / "x", from_stage=2)
    bad = load_session(original.path)
    bad.recipe["stages"][0]["k"] = "two"
    with pytest.raises(SessionError, match="recipe cannot be run"):
        replay(bad, tmp_path / "x")
    (tmp_path / "cut.json").write_text(original.dumps()[:100])
    assert main(["replay", str(tmp_path / "cut.json")]) == 2
    assert "truncated" in capsys.readouterr().out


def test_cancel_leaves_a_valid_session_with_finished_stages(tiny_model_dir, data_dir, tmp_path):
    cancel = threading.Event()

    def listener(e):
        if isinstance(e, ev.StageFinished) and e.stage == 1:
            cancel.set()

    out = tmp_path / "cancelled"
    s = record_run(
        tiny_recipe(tiny_model_dir), out, data_dir=data_dir, cancel=cancel, listener=listener, save_models=False
    )
    loaded = load_session(out)
    assert loaded.status == s.status == "cancelled"
    assert [st.status for st in loaded.stages[:2]] == ["done", "done"]
    assert loaded.stages[1].metric("perplexity") is not None
    assert loaded.stages[2].status in ("cancelled", "skipped")
    assert json.loads((out / "session.json").read_text())["format"] == "frankenlab-session"


def test_resuming_needs_a_plain_saved_model(tmp_path):
    def folder(name, config):
        d = tmp_path / "run" / "stages" / name
        d.mkdir(parents=True)
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        else:
            (d / "adapter_config.json").write_text("{}")
        return str(d)

    stages = [
        StageRecord(0, "baseline", status="done"),
        StageRecord(1, "depth", status="done", artifact=folder("01-depth", {"num_hidden_layers": 6})),
        StageRecord(2, "lora", status="done", artifact=folder("02-lora", None)),
        StageRecord(3, "gptq", status="done", artifact=folder("03-gptq", {"quantization_config": {"bits": 4}})),
        StageRecord(4, "eora", status="done"),
    ]
    s = Session(
        recipe={
            "name": "r",
            "stages": [{"kind": "depth", "k": 2}, {"kind": "lora"}, {"kind": "gptq"}, {"kind": "eora"}],
        },
        stages=stages,
    )
    s.save(tmp_path / "run" / "session.json")
    assert resume_problem(s, 2) is None
    assert "not a full model" in resume_problem(s, 3)
    assert "quantized" in resume_problem(s, 4)
    with pytest.raises(SessionError, match=r"stage 3 \(gptq\) saved a quantized model.*--from-stage 2 instead"):
        replay(s, tmp_path / "x", from_stage=4)
