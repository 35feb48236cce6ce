"""The lab's state without an app: run folders, chat targets, the live session, the grid's plan, replay text."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from frankenlab.evals.config import option
from frankenlab.pipeline import events as ev
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.recipe import Recipe, StageSpec
from frankenlab.pipeline.stages import depth, register, unregister, width
from frankenlab.sessions import Session, SessionError, StageRecord
from frankenlab.tui.lab_state import (
    LabState,
    grid_plan,
    layer_scores,
    protected_layers,
    replay_diff_line,
    replay_verdict,
)
from frankenlab.tui.latency import LatencyProbe

ROOT = Path(__file__).resolve().parent.parent


class FakeLoader:
    """Records what the lab asks to load; returns a stand-in LoadedModel."""

    def __init__(self):
        self.calls = []

    def __call__(self, ref, **kw):
        self.calls.append((ref, kw))
        return SimpleNamespace(
            model=f"model@{ref}", tokenizer=f"tok@{ref}", source=SimpleNamespace(name=Path(ref).name)
        )


def make_lab(tmp_path, **kw) -> LabState:
    kw.setdefault("loader", FakeLoader())
    return LabState(runner=lambda *a, **k: None, runs_dir=tmp_path / "runs", device="cpu", dtype="float32", **kw)


def saved_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


# -- run folders ------------------------------------------------------------------------------------
def test_run_folder_naming_and_clash_suffix(tmp_path):
    lab = make_lab(tmp_path)
    first = lab.new_run_dir("short", stamp="20250101-120000")
    assert first == tmp_path / "runs" / "short-20250101-120000"
    first.mkdir(parents=True)
    second = lab.new_run_dir("short", stamp="20250101-120000")
    assert second.name == "short-20250101-120000-2"
    second.mkdir()
    assert lab.new_run_dir("short", stamp="20250101-120000").name == "short-20250101-120000-3"
    assert lab.new_run_dir("replay-short").name.startswith("replay-short-")  # the real clock's stamp


def test_begin_run_gives_a_fresh_cancel_flag(tmp_path):
    lab = make_lab(tmp_path)
    lab.cancel.set()
    out = lab.begin_run("r")
    assert lab.running and not lab.cancel.is_set() and lab.run_dir == out and out.parent == tmp_path / "runs"


# -- chat targets -----------------------------------------------------------------------------------
def test_chat_targets_from_model_grid_plan_and_session_stages(tmp_path):
    loader = FakeLoader()
    lab = make_lab(tmp_path, loader=loader)
    assert lab.chat_targets() == {}
    lab.loaded = SimpleNamespace(model="base-model", tokenizer="base-tok", source=SimpleNamespace(name="tiny"))
    run = tmp_path / "runs" / "short-1"
    d1 = saved_model(run / "stages" / "1-depth")
    lab.session = Session(
        recipe={"name": "r"},
        stages=[
            StageRecord(0, "baseline", "baseline", status="done"),
            StageRecord(1, "depth", "depth", status="done", artifact=str(d1)),
            StageRecord(2, "width", "width", status="done", artifact=str(run / "stages" / "2-width")),  # folder gone
            StageRecord(3, "lora", "lora", status="failed", artifact=str(d1)),
            StageRecord(4, "gptq", "", status="done"),  # saved no model
        ],
    )
    plan = LayerPlan.without(8, [2])
    targets = lab.chat_targets(plan)
    assert [t.label for t in targets.values()] == [
        "baseline (tiny)",
        f"baseline + plan {plan.to_text()}",
        "stage 1 depth",
    ]
    assert targets["base"].resolve() == ("base-model", "base-tok")
    assert targets["plan"].plan == plan and targets["plan"].resolve() == ("base-model", "base-tok")
    assert not loader.calls, "a stage model loads only when someone chats with it"
    stage = targets[f"stage1:{d1}"]
    assert stage.resolve() == (f"model@{d1}", f"tok@{d1}")
    assert loader.calls == [(str(d1), {"device": "cpu", "dtype": "float32"})]
    assert "plan" not in lab.chat_targets(LayerPlan.identity(8))


def test_chat_targets_find_stage_models_of_a_moved_run_folder(tmp_path):
    moved = tmp_path / "elsewhere"
    saved_model(moved / "stages" / "1-depth")
    lab = make_lab(tmp_path)
    lab.session = Session(
        recipe={"name": "r"},
        stages=[StageRecord(1, "depth", "depth", status="done", artifact="runs/gone-123/stages/1-depth")],
    )
    lab.session.path = str(moved / "session.json")
    (target,) = lab.chat_targets().values()
    assert target.label == "stage 1 depth"
    target.resolve()
    assert lab.loader.calls[0][0] == str(moved / "stages" / "1-depth")


# -- the live session -------------------------------------------------------------------------------
def run_events(out: Path, artifact: Path) -> list[ev.Event]:
    record = StageRecord(
        1,
        "depth",
        "depth",
        {"k": 1},
        status="done",
        metrics=[{"name": "perplexity", "value": 12.5, "protocol": "p"}],
        params_count=10,
        params_nonzero=10,
        num_layers=7,
        footprint={"total_bytes": 1234},
        seconds=1.0,
        artifact=str(artifact),
        report={"scores": {"1": 3.0, "2": 1.0}},
    )
    return [
        ev.RunStarted(
            -1,
            recipe={"name": "short", "stages": [{"kind": "depth", "k": 1}]},
            out_dir=str(out),
            stages=[
                {"index": 0, "kind": "baseline", "name": "baseline", "params": {}},
                {"index": 1, "kind": "depth", "name": "depth", "params": {"k": 1}},
            ],
        ),
        ev.StageStarted(0, kind="baseline", params={}),
        ev.StageFinished(
            StageRecord(0, "baseline", "baseline", status="done", seconds=0.5, footprint={"total_bytes": 2000})
        ),
        ev.StageStarted(1, kind="depth", params={"k": 1}),
        ev.Progress(1, fraction=0.5),
        ev.StageFinished(record),
        ev.RunFinished(-1, status="done", out_dir=str(out)),
    ]


def test_live_session_is_built_from_events_alone(tmp_path):
    lab = make_lab(tmp_path)
    lab.loaded = SimpleNamespace(model="m", tokenizer="t", source=SimpleNamespace(name="tiny"))
    lab.session = opened = Session(recipe={"name": "opened before"})
    out = lab.begin_run("short")
    artifact = saved_model(out / "stages" / "1-depth")
    changed = [lab.apply(e) for e in run_events(out, artifact)]
    assert changed == [False, False, True, False, False, True, False]  # only stage records change the panes
    s = lab.session
    assert s is not opened and s.recipe["name"] == "short" and s.status == "done"
    assert s.stages[0].footprint == {"total_bytes": 2000}
    st = s.stages[1]
    assert (st.footprint, st.artifact, st.num_layers) == ({"total_bytes": 1234}, str(artifact), 7)
    assert st.metric("perplexity")["value"] == 12.5
    assert "stage 1 depth" in [t.label for t in lab.chat_targets().values()]
    assert layer_scores(s, 8) == {1: 3.0, 2: 1.0}
    assert not (out / "session.json").exists(), "the live session is never written (the runner's recorder saves)"
    # the end: the runner's saved session wins; a runner that raised leaves the live one on screen
    live = lab.session
    lab.end_run(None)
    assert lab.session is live and not lab.running
    saved = Session(recipe={"name": "short"}, status="done")
    lab.begin_run("short")
    lab.end_run(saved)
    assert lab.session is saved
    assert lab.apply(ev.StageStarted(1, kind="depth", params={})) is False  # no run: nothing to feed


def test_live_session_of_a_cancelled_run(tmp_path):
    lab = make_lab(tmp_path)
    out = lab.begin_run("short")
    events = run_events(out, saved_model(out / "stages" / "1-depth"))[:4]  # started, baseline done, stage 1 started
    events += [
        ev.RunCancelled(1, "cancelled by the user; finished stages are kept"),
        ev.RunFinished(1, status="cancelled", out_dir=str(out)),
    ]
    for e in events:
        lab.apply(e)
    s = lab.session
    assert s.status == "cancelled" and [st.status for st in s.stages] == ["done", "cancelled"]
    assert s.stages[1].error == "cancelled by the user; finished stages are kept"
    assert [e["event"] for e in s.events][-2:] == ["RunCancelled", "RunFinished"]
    assert s.events[-2] == {"event": "RunCancelled", "time": events[-2].time, "stage": 1, "message": s.stages[1].error}


def test_progress_is_thinned_per_stage(tmp_path):
    lab = make_lab(tmp_path)
    now = [100.0]
    lab.clock = lambda: now[0]
    assert lab.forward(ev.Progress(1, fraction=0.1))
    assert not lab.forward(ev.Progress(1, fraction=0.2))  # 0 s later
    assert lab.forward(ev.Progress(2, fraction=0.2))  # another stage has its own clock
    assert lab.forward(ev.Progress(1, fraction=1.0))  # the end of a stage always shows
    assert lab.forward(ev.LogLine(1, "hello"))
    now[0] += 0.2
    assert lab.forward(ev.Progress(1, fraction=0.3))


# -- what the grid shows ----------------------------------------------------------------------------
def recipe(*stages) -> Recipe:
    return Recipe(name="r", stages=list(stages))


def test_grid_plan_from_a_recipe_through_the_stage_hook():
    assert grid_plan(recipe(), 8) is None
    assert grid_plan(recipe(StageSpec("depth", depth.Config(plan="0-1,3,3-7"))), 8) == LayerPlan.parse("0-1,3,3-7", 8)
    assert grid_plan(recipe(StageSpec("depth", depth.Config(layers=(2, 5)))), 8) == LayerPlan.without(8, [2, 5])
    assert grid_plan(recipe(StageSpec("depth", depth.Config(k=1, metric="l1"))), 8) is None  # known after the run
    after_width = recipe(StageSpec("width", width.Config(pattern="2:4")), StageSpec("depth", depth.Config(layers=(4,))))
    assert grid_plan(after_width, 8) == LayerPlan.without(8, [4])  # width keeps the layers
    after_rank = recipe(
        StageSpec("depth", depth.Config(k=1, metric="l1")), StageSpec("depth", depth.Config(layers=(4,)))
    )
    assert grid_plan(after_rank, 8) is None  # a plan over 7 layers cannot be drawn on the model's 8
    with pytest.raises(ValueError):
        grid_plan(recipe(StageSpec("depth", depth.Config(plan="0-9"))), 8)


def test_grid_plan_asks_the_registry_not_the_kind_name():
    toy = types.ModuleType("toy_plan_stage")

    @dataclass(frozen=True)
    class Config:
        keep: int = option(4, help="keep the first `keep` layers")

    toy.Config, toy.run = Config, lambda model, ctx, config: None
    toy.layer_plan = lambda config, n: LayerPlan.parse(f"0-{config.keep - 1}", n)
    register("toyplan", toy)
    try:
        assert grid_plan(recipe(StageSpec("toyplan", Config(keep=3))), 8) == LayerPlan.parse("0-2", 8)
    finally:
        unregister("toyplan")


def test_layer_scores_and_protected_layers():
    s = Session(
        recipe={"name": "r"},
        stages=[
            StageRecord(0, "baseline", "baseline"),
            StageRecord(1, "depth", "depth", report={"scores": {"3": 5.0, "1": 2.5}}),
        ],
    )
    assert layer_scores(s, 8) == {3: 5.0, 1: 2.5}
    assert layer_scores(s, 3) is None  # scores of a deeper model
    assert layer_scores(Session(recipe={"name": "r"}, stages=[StageRecord(1, "width", "width", report={})]), 8) is None
    assert protected_layers(8, 2, 1) == {0, 1, 7}
    assert protected_layers(3, 4, 2) == {0, 1, 2}


# -- sessions and replays ---------------------------------------------------------------------------
def test_open_session_validates_and_says_why(tmp_path):
    lab = make_lab(tmp_path)
    good = Session(recipe={"name": "r"}, status="done", stages=[StageRecord(0, "baseline", "baseline", status="done")])
    good.save(tmp_path / "run" / "session.json")
    s = lab.open_session(tmp_path / "run")  # a run folder works as well as its session.json
    assert lab.session is s and s.id == good.id and lab.run_dir == tmp_path / "run"
    # Save-as offers a new file in the user's session folder, never the run's own session.json
    from frankenlab.sessions.store import user_sessions_dir

    default = Path(lab.save_session_default())
    assert default.parent == user_sessions_dir() and default.name == f"r-{s.id}.json"
    default.parent.mkdir(parents=True)
    default.write_text("taken")
    assert Path(lab.save_session_default()).name == f"r-{s.id}-2.json"  # a new name, nothing overwritten
    bad = tmp_path / "bad" / "session.json"
    bad.parent.mkdir()
    for text in ("{not json", json.dumps([1, 2]), json.dumps({"format": "frankenlab-session", "stages": "x"}), ""):
        bad.write_text(text)
        with pytest.raises(SessionError) as err:
            lab.open_session(bad)
        assert "\n" not in str(err.value).strip()
    with pytest.raises(SessionError):
        lab.open_session(tmp_path / "missing")
    assert lab.session is s, "a session that cannot be opened leaves the shown one alone"


def test_replay_texts():
    diff = SimpleNamespace(stage=1, name="perplexity", protocol="p", saved=12.5, new=12.75, relative=0.02, status="ok")
    assert replay_diff_line(diff) == ("replay [1] perplexity (p): saved 12.5 new 12.75 (+2.00%) ok", "info")
    off = SimpleNamespace(
        stage=2, name="triviaqa_closed", protocol="q", saved=0.5, new=0.25, relative=None, status="differs"
    )
    assert replay_diff_line(off) == ("replay [2] triviaqa_closed (q): saved 0.5 new 0.25 differs", "warning")
    ok = SimpleNamespace(ok=True, diffs=[diff, diff], flagged=[], tolerance=0.02)
    assert replay_verdict(ok) == ("replay reproduced: 2 metrics compared, 0 outside tolerance 2.0%", "info")
    bad = SimpleNamespace(ok=False, diffs=[diff, off], flagged=[off], tolerance=0.05)
    assert replay_verdict(bad) == ("replay differs: 2 metrics compared, 1 outside tolerance 5.0%", "warning")


# -- the model, the latency probe, and no Textual ------------------------------------------------------
def test_model_ready_counts_layers_and_freezes_the_collector(tmp_path, tiny):
    lab = make_lab(tmp_path)
    try:
        assert lab.model_ready(tiny) == 8 and lab.loaded is tiny and lab.n_layers == 8
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_latency_probe_counts_only_while_active():
    now = [0.0]
    probe = LatencyProbe(tick=0.05, clock=lambda: now[0])
    assert probe.text() == "event loop: no samples"
    now[0] += 1.0
    probe.tick()  # not running: not recorded
    probe.start()
    for late in (0.0, 0.0, 0.2):
        probe.last_event = f"event {late}"
        now[0] += 0.05 + late
        probe.tick()
    probe.stop()
    now[0] += 5
    probe.tick()
    assert len(probe.gaps) == 3
    assert "3 ticks of 50 ms; largest extra delay 200 ms (after: event 0.2)" in probe.text()


def test_lab_state_imports_without_textual():
    code = (
        "import sys, frankenlab.tui.lab_state, frankenlab.tui.latency, frankenlab.tui.palette\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
