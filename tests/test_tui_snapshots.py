"""SVG snapshots of the lab's main panes at 80x24 and 160x48 (tiny model, fixed session, no timings)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from frankenlab.tui.cli.main import _quiet_libraries

_quiet_libraries()
torch.set_num_threads(1)

SIZES = [(80, 24), (160, 48)]


@pytest.fixture(scope="module")
def fixed_model(tiny_model_dir):
    from frankenlab.pipeline.loading import ModelSource, load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    return replace(lm, source=ModelSource("folder", "models/tiny-llama", "/models/tiny-llama", "tiny-llama"))


def fixed_session(path):
    """A session with fixed numbers (no run, no timings)."""
    from frankenlab.sessions.session import Session, StageRecord

    def fp(w):
        return {
            "components": {
                "embeddings": 81920,
                "attention": w // 2,
                "mlp": w // 2,
                "cache": 65536,
                "activations": 4096,
            },
            "weights_bytes": 81920 + w,
            "runtime_bytes": 69632,
            "cache": {"layers": 8, "kv_heads": 2, "head_dim": 16, "context": 64, "batch": 1, "dtype": "float32"},
            "total_bytes": 81920 + w + 69632,
        }

    stages = [
        StageRecord(
            0,
            "baseline",
            "baseline",
            status="done",
            params_count=365632,
            params_nonzero=365632,
            num_layers=8,
            seconds=1.0,
            footprint=fp(1_300_000),
            metrics=[
                {"name": "perplexity", "value": 412.5, "protocol": "wikitext2-concat-64:first2"},
                {"name": "triviaqa_closed", "value": 0.0, "protocol": "triviaqa:first8"},
            ],
        ),
        StageRecord(
            1,
            "depth",
            "depth",
            status="done",
            params_count=330000,
            params_nonzero=330000,
            num_layers=7,
            seconds=2.0,
            footprint=fp(1_150_000),
            report={"scores": {"1": 500.0, "2": 430.0, "3": 470.0, "4": 420.0, "5": 415.0, "6": 600.0}},
            metrics=[{"name": "perplexity", "value": 455.25, "protocol": "wikitext2-concat-64:first2"}],
        ),
        StageRecord(
            2,
            "width",
            "width",
            status="done",
            params_count=330000,
            params_nonzero=180000,
            num_layers=7,
            seconds=3.0,
            footprint=fp(700_000),
            metrics=[{"name": "perplexity", "value": 620.0, "protocol": "wikitext2-concat-64:first2"}],
        ),
    ]
    recipe = {
        "name": "snap",
        "description": "",
        "model": {"source": "models/tiny-llama"},
        "stages": [{"kind": "depth", "k": 1, "metric": "l1"}, {"kind": "width", "pattern": "2:4"}],
    }
    events = [
        {
            "event": "MetricMeasured",
            "stage": 3,
            "name": "lora_loss",
            "value": 3.0 - 0.1 * i,
            "step": i,
            "protocol": "",
            "time": 0.0,
        }
        for i in range(10)
    ]
    s = Session(recipe=recipe, stages=stages, events=events, status="done", id="0123456789ab", created=0.0)
    s.save(path)
    return path


def make(fixed_model, tmp_path, data_dir, **kw):
    from frankenlab.tui.app import create_app

    return create_app(
        loaded=fixed_model,
        model_ref="models/tiny-llama",
        data_dir=data_dir,
        runs_dir=tmp_path / "runs",
        whatif=False,
        **kw,
    )


async def settle(pilot, until=lambda app: True):
    """Wait for the state the picture shows (workers done, `until(app)` true), never for a time:
    on a loaded machine a fixed pause ended before the pane had drawn what the snapshot expects."""
    for _ in range(2000):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        if until(pilot.app):
            # toasts ("recipe loaded", "session opened") vanish after a time: on a loaded machine
            # they were still up, on an idle one gone. The pictures show the panes without them.
            pilot.app.clear_notifications()
            await pilot.pause()  # one more frame drawn with that state
            return
    raise AssertionError("the pane never reached the state of its snapshot")


def recipe_shown(app) -> bool:
    form = app.query_one("#form")
    return app.query_one("#tabs").active == "recipe" and bool(form.query("#width-ratio")) and app.focused is None


def results_shown(app) -> bool:
    memory = app.query_one("#memory")
    return (
        app.query_one("#tabs").active == "results"
        and app.query_one("#results-table").row_count == 3
        and "baseline" in memory.footprints
        and app.query_one("#memory-state").value == "stage 2 width"
        and bool(str(app.query_one("#memory-bars").render()).strip())
    )


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layers_pane(snap_compare, fixed_model, tmp_path, data_dir, size):
    app = make(fixed_model, tmp_path, data_dir)

    async def before(pilot):
        await settle(pilot)
        grid = pilot.app.query_one("#grid")
        grid.set_scores({1: 500.0, 2: 430.0, 3: 470.0, 4: 420.0, 5: 415.0, 6: 600.0})
        await pilot.press("right", "right", "space", "right", "plus")
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_recipe_pane(snap_compare, fixed_model, tmp_path, data_dir, size):
    app = make(fixed_model, tmp_path, data_dir, recipe="depth2-width1of8")

    async def before(pilot):
        await settle(pilot)
        await pilot.press("2")
        await settle(pilot, lambda app: app.query_one("#tabs").active == "recipe")
        pilot.app.set_focus(None)
        await settle(pilot, recipe_shown)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_results_pane(snap_compare, fixed_model, tmp_path, data_dir, size):
    app = make(fixed_model, tmp_path, data_dir, session_path=fixed_session(tmp_path / "s" / "session.json"))

    async def before(pilot):
        await settle(
            pilot,
            lambda app: (
                app.query_one("#results-table").row_count == 3 and "baseline" in app.query_one("#memory").footprints
            ),
        )
        pilot.app.query_one("#memory-state").value = "stage 2 width"
        await settle(pilot, results_shown)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_pane_ab(snap_compare, fixed_model, tmp_path, data_dir, size):
    app = make(fixed_model, tmp_path, data_dir)

    async def before(pilot):
        await settle(pilot)
        pilot.app.query_one("#grid").toggle(3)
        await pilot.press("5")
        await settle(pilot)
        pilot.app.query_one("#chatpanel").select(a="base", b="plan", ab=True)
        await settle(pilot)
        pilot.app.set_focus(None)  # no blinking cursor in the picture
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help_screen(snap_compare, fixed_model, tmp_path, data_dir, size):
    app = make(fixed_model, tmp_path, data_dir)

    async def before(pilot):
        await settle(pilot)
        await pilot.press("f1")
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_whatif_line_and_own_deltas(snap_compare, fixed_model, tmp_path, data_dir, size):
    """The what-if line with its plan beside the number; cells with their own effects (issue 26)."""
    from tests.test_tui_whatif import SlowEstimator

    fake = SlowEstimator()
    app = create_whatif_app(fixed_model, tmp_path, data_dir, lambda lm, d: fake)

    def line_final(app) -> bool:
        text = str(app.query_one("#whatif").render())
        return "full slice" in text and "skip 2 repeat 3x2" in text and app.query_one("#grid").own_delta(3) is not None

    async def before(pilot):
        await settle(pilot, lambda app: fake.ready)
        await pilot.press("right", "right", "space")
        await settle(pilot, lambda app: pilot.app.query_one("#grid").own_delta(2) is not None)
        await pilot.press("right", "plus")
        await settle(pilot, line_final)

    assert snap_compare(app, terminal_size=size, run_before=before)


def create_whatif_app(fixed_model, tmp_path, data_dir, factory):
    from frankenlab.tui.app import create_app

    return create_app(
        loaded=fixed_model,
        model_ref="models/tiny-llama",
        data_dir=data_dir,
        runs_dir=tmp_path / "runs",
        whatif=True,
        estimator_factory=factory,
    )


# -- screens that say what they mean: memory, sessions, compare, sweep, run log (80x24 and 120x40) ----
SIZES_2 = [(80, 24), (120, 40)]


@pytest.mark.parametrize("size", SIZES_2, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memory_pane(snap_compare, fixed_model, tmp_path, data_dir, size):
    """Bars on a log scale past the budget, the cache line with its context and dtype, weights vs memory."""
    app = make(fixed_model, tmp_path, data_dir, session_path=fixed_session(tmp_path / "s" / "session.json"))

    async def before(pilot):
        await settle(pilot, lambda app: app.query_one("#results-table").row_count == 3)
        await settle(pilot, results_shown)
        pilot.app.query_one("#memory-bars").scroll_visible(animate=False, top=True)
        await settle(pilot, results_shown)

    assert snap_compare(app, terminal_size=size, run_before=before)


def listed_sessions(runs):
    """Two sessions in `runs`: a finished one and a cancelled one (fixed ids, times and numbers)."""
    from frankenlab.sessions import load_session

    done = load_session(fixed_session(runs / "snap-done" / "session.json"))
    cancelled = load_session(fixed_session(runs / "snap-cut" / "session.json"))
    for s in (done, cancelled):
        s.stages[1].params, s.stages[2].params = {"k": 1, "metric": "l1"}, {"pattern": "2:4"}
    done.save(runs / "snap-done" / "session.json")
    cancelled.status, cancelled.id, cancelled.created = "cancelled", "ba9876543210", 60.0
    cancelled.stages[2].status, cancelled.stages[2].metrics = "cancelled", []
    cancelled.save(runs / "snap-cut" / "session.json")
    return [done, cancelled]


@pytest.mark.parametrize("size", SIZES_2, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sessions_list(snap_compare, fixed_model, tmp_path, data_dir, size, monkeypatch):
    """Each session with its stages done of recorded (as the CLI counts) and its last perplexity."""
    monkeypatch.chdir(tmp_path)  # the list shows paths: relative ones, the same on every machine
    listed_sessions(tmp_path / "runs")
    from frankenlab.tui.app import create_app

    app = create_app(
        loaded=fixed_model, model_ref="models/tiny-llama", data_dir=data_dir, runs_dir="runs", whatif=False
    )

    async def before(pilot):
        await settle(pilot)
        await pilot.press("6")
        await settle(pilot, lambda app: app.query_one("#sessions-list").option_count == 2)
        pilot.app.set_focus(None)
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES_2, ids=lambda s: f"{s[0]}x{s[1]}")
def test_compare_screen(snap_compare, fixed_model, tmp_path, data_dir, size):
    """PPL with its protocol on screen; the cancelled run's finished stages are "done"."""
    from frankenlab.tui.screens.compare import CompareScreen

    sessions = listed_sessions(tmp_path / "runs")
    app = make(fixed_model, tmp_path, data_dir)

    async def before(pilot):
        await settle(pilot)
        pilot.app.push_screen(CompareScreen(sessions))
        await settle(pilot, lambda app: isinstance(app.screen, CompareScreen) and app.screen.query("#compare-table"))

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES_2, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sweep_pane_check(snap_compare, fixed_model, tmp_path, data_dir, size):
    """The bundled sweep names in full; Check lists the configurations."""
    app = make(fixed_model, tmp_path, data_dir)

    async def before(pilot):
        await settle(pilot)
        await pilot.press("7")
        await settle(pilot, lambda app: app.query_one("#tabs").active == "sweep")
        pilot.app.query_one("#sweep-file").value = "thesis-table-4.1"
        pilot.app.query_one("#sweeppane").check()
        await settle(pilot, lambda app: len(app.query_one("#sweep-log").lines) > 3)
        pilot.app.set_focus(None)
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES_2, ids=lambda s: f"{s[0]}x{s[1]}")
def test_run_log(snap_compare, fixed_model, tmp_path, data_dir, size):
    """Stage settings as k=v (only those that apply); long lines wrap whole beside the scrollbar."""
    from frankenlab.pipeline import events as ev

    app = make(fixed_model, tmp_path, data_dir)

    async def before(pilot):
        await settle(pilot)
        await pilot.press("3")
        await settle(pilot, lambda app: app.query_one("#tabs").active == "run")
        panel = pilot.app.query_one("#runpanel")
        panel.reset("running snap: depth + width -> runs/snap")
        params = {"k": 1, "metric": "l1", "protected_first": 1, "protected_last": 1, "samples": 8}
        for i in range(3):
            panel.write(f"line {i}: " + " ".join(f"word{j:02d}" for j in range(24)))
        panel.handle(ev.StageStarted(1, "depth", {**params, "layers": None, "plan": None}, time=0.0))
        panel.handle(ev.StageStarted(2, "depth", {**params, "layers": None, "plan": "0-2,4,4,5-7"}, time=0.0))
        panel.handle(ev.MetricMeasured(2, "perplexity", 455.25, "wikitext2-concat-64:first2", time=0.0))
        pilot.app.set_focus(None)
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)
