"""Pilot tests of the lab on the tiny model: layers, N:M, a short run, cancel, sessions, chat."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from frankenlab.tui.cli.main import _quiet_libraries

_quiet_libraries()
torch.set_num_threads(1)  # the tiny model gains nothing from threads; a busy CI box loses a lot

SIZE = (100, 40)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def short_recipe(**evaluation):
    from frankenlab.evals.suite import EvalConfig
    from frankenlab.pipeline.calibration import CalibrationConfig
    from frankenlab.pipeline.recipe import Recipe, StageSpec
    from frankenlab.pipeline.stages import depth, width

    ev = dict(perplexity=("wikitext2-concat-64",), ppl_limit=2, samples=False)
    ev.update(evaluation)
    return Recipe(
        name="short",
        calibration=CalibrationConfig("c4", samples=4, seq_len=32),
        evaluation=EvalConfig(**ev),
        stages=[
            StageSpec("depth", depth.Config(k=1, metric="l1", protected_first=1, protected_last=1)),
            StageSpec("width", width.Config(pattern="2:4")),
        ],
    )


def make_app(loaded, tmp_path, data_dir, **kw):
    from frankenlab.tui.app import create_app

    kw.setdefault("whatif", False)
    return create_app(
        loaded=loaded,
        model_ref=loaded.source.ref,
        data_dir=data_dir,
        runs_dir=tmp_path / "runs",
        save_models=True,
        chat_tokens=8,
        **kw,
    )


async def wait_for(pilot, cond, timeout=60.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached in time")


async def test_toggle_layers_and_use_plan(loaded, tmp_path, data_dir):
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        grid = app.query_one("#grid")
        await pilot.pause()
        assert app.focused is grid
        await pilot.press("right", "right", "space")  # skip layer 2
        await pilot.press("right", "plus")  # repeat layer 3
        assert grid.counts[:4] == [1, 1, 0, 2]
        from frankenlab.tui.widgets.layer_grid import CELL_W

        await pilot.click("#grid", offset=(CELL_W * 5 + 2, 0))  # a click on cell 5 skips it
        assert grid.counts[5] == 0
        await pilot.pause()
        text = str(app.query_one("#plan-text").render())
        assert "0-1,3,3-4,6-7" in text and "skipped [2, 5]" in text
        await pilot.press("u")
        recipe = app.query_one("#form").build()
        assert recipe.stages[0].kind == "depth" and recipe.stages[0].config.plan == "0-1,3,3-4,6-7"
        assert "baseline + plan 0-1,3,3-4,6-7" in [t.label for t in app.chat_targets().values()]
        await pilot.press("0")
        assert grid.counts == [1] * 8


async def test_whatif_in_the_lab(loaded, tmp_path, data_dir):
    """Toggle -> estimate on the what-if line and the layer's own delta beside the cell; latest toggle wins; scan."""
    from frankenlab.pipeline.plans import LayerPlan
    from frankenlab.pipeline.whatif import WhatIfEstimator
    from frankenlab.tui.widgets.layer_grid import format_delta

    app = make_app(
        loaded,
        tmp_path,
        data_dir,
        whatif=True,
        estimator_factory=lambda lm, d: WhatIfEstimator(lm.model, lm.tokenizer, data_dir=d, samples=2, seq_len=64),
    )
    async with app.run_test(size=SIZE) as pilot:
        grid, line = app.query_one("#grid"), app.query_one("#whatif")
        await wait_for(pilot, lambda: line.scheduler is not None)
        est = line.scheduler.estimator
        await wait_for(pilot, lambda: est.ready)  # the baseline pass warms up before any toggle
        assert not est._memo.keys() - {tuple(range(8))}, "the warm-up estimates nothing but the baseline"

        shown = []  # every text the what-if line showed, in order
        update = line.update
        line.update = lambda content="", **kw: (shown.append(str(content)), update(content, **kw))[1]
        await pilot.press("right", "space")  # skip layer 1
        plan1 = LayerPlan.without(8, [1])
        await wait_for(pilot, lambda: (1, 0) in grid.tried)
        known = est.known(plan1)
        assert grid.tried[(1, 0)] == known.delta
        assert f"what-if skip 1: ppl {known.ppl:.2f}" in str(line.render())
        # progressive: a first answer on half the slice (1 of 2 samples), a rough guess; then the exact number
        first = next(i for i, t in enumerate(shown) if "from 1/2 of the slice (63/126 tokens)" in t)
        final = next(i for i, t in enumerate(shown) if "full slice (126 tokens)" in t)
        assert first < final and "ppl ≈" in shown[first] and "rough guess ±" in shown[first]
        assert f"ppl {known.ppl:.2f}" in shown[final] and "full slice (126 tokens)" in str(line.render())
        assert format_delta(known.delta) in str(grid.render())

        await pilot.press("right", "space", "right", "space")  # skip 2, then at once 3
        final = LayerPlan.without(8, [1, 2, 3])
        await wait_for(pilot, lambda: (3, 0) in grid.tried)
        # the cell shows layer 3's own effect (skipped alone), the line the whole plan's
        assert grid.tried[(3, 0)] == est.known(LayerPlan.without(8, [3])).delta
        await wait_for(pilot, lambda: f"what-if skip 1-3: ppl {est.known(final).ppl:.2f}" in str(line.render()))

        await pilot.press("0", "i")  # back to the full model, then the importance scan: coarse first, then exact
        await wait_for(pilot, lambda: len(grid.scores) == 8 and "scan done" in str(line.render()))
        assert any("importance scan (rough, 1/2 of the slice" in t for t in shown)
        assert any("importance scan (exact)" in t for t in shown)
        exact = {i: est.known(LayerPlan.without(8, [i])) for i in range(8)}
        # the grid's messages may still be queued behind the last line update: wait for the exact values
        await wait_for(
            pilot,
            lambda: all(grid.tried.get((i, 0)) == e.delta and grid.scores.get(i) == e.ppl for i, e in exact.items()),
        )


async def test_width_nm_and_refusals(loaded, tmp_path, data_dir):
    from textual.widgets import Button, Input, Select

    from frankenlab.evals.errors import RecipeError

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        form = app.query_one("#form")
        assert form.build().stages == []  # a fresh form runs no stage
        form.query_one("#add-kind", Select).value = "width"  # add a width stage from the picker
        await pilot.pause()
        form.query_one("#add-stage", Button).press()
        await wait_for(pilot, lambda: form.query("#width-ratio"), timeout=10)
        form.query_one("#width-ratio", Select).value = "12:16"
        await pilot.pause()
        assert "prunes 12 of every 16 weights (75.0% removed)" in str(form.query_one("#width-says").render())
        assert form.build().stages[0].config.n == 12
        assert form.build().stages[0].config.sequential == "projection"
        form.query_one("#width-sequential", Select).value = "layer"
        await pilot.pause()
        assert form.build().stages[0].config.sequential == "layer"
        form.query_one("#width-ratio", Select).value = "custom"
        await pilot.pause()
        custom = form.query_one("#width-custom", Input)
        custom.focus()
        custom.value = "5:4"  # typed keys can race focus on a loaded machine; the value path is the same
        await pilot.pause()
        field = form.query_one("#width-custom-field")
        await wait_for(
            pilot, lambda: "N must be smaller than M" in str(field.query_one(".field-error").render()), timeout=10
        )
        assert field.has_class("invalid")
        with pytest.raises(RecipeError):
            form.build()
        custom.value = "3:8"
        await wait_for(pilot, lambda: not field.has_class("invalid"), timeout=10)
        assert form.build().stages[0].config.label.startswith("3:8 (prunes 3 of every 8")
        depth = form.add_stage("depth")
        await wait_for(pilot, lambda: depth.query("#depth-k"), timeout=10)
        k = depth.query_one("#depth-k", Input)
        k.value = "-1"
        await wait_for(pilot, lambda: form.query_one("#depth-k-field").has_class("invalid"), timeout=10)


async def test_run_results_save_and_reopen(loaded, tmp_path, data_dir):
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app._show_recipe(short_recipe())
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.lab.session is not None and not app.lab.running, timeout=90)
        s = app.lab.session
        assert s.status == "done", s.stages
        rows = app.query_one("#resultspanel").rows
        assert set(rows) == {0, 1, 2}
        assert all("perplexity" in r.metrics for r in rows.values())
        assert rows[1].layers == 7
        table = app.query_one("#results-table")
        assert table.row_count == 3
        assert "wikitext2-concat-64" in str(table.get_row_at(0)[3])
        log = "\n".join(str(line.text) for line in app.query_one("#run-log").lines)
        # the event-loop probe is a developer's measurement: in the run's run.log, not the lab's log
        assert "event loop during the run" not in log
        assert "event loop during the run" in (app.lab.run_dir / "run.log").read_text()
        assert "[1] depth started: k=1, metric=l1, protected_first=1, protected_last=1" in log
        assert "{" not in log and "None" not in log  # settings as k=v, only the fields that apply
        labels = [t.label for t in app.chat_targets().values()]
        assert "stage 1 depth" in labels and "stage 2 width" in labels
        # the memory-bar selector follows the latest finished stage (issue 14), reachable with "m"
        memory = app.query_one("#memory")
        sel = app.query_one("#memory-state")
        await wait_for(pilot, lambda: str(sel.value).startswith("stage 2"), timeout=20)
        app.query_one("#results-table").focus()
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "results-table")
        await pilot.press("m")
        assert app.focused is sel
        sel.value = "baseline"  # the user picks one: later stages do not move it
        await wait_for(pilot, lambda: memory.picked == "baseline")
        memory.set_session(s)
        await pilot.pause()
        assert sel.value == "baseline"
        # every save says where it wrote: a typed folder gets session.json inside it
        (tmp_path / "folder").mkdir()
        for typed, expect in (
            (str(tmp_path / "folder") + "/", tmp_path / "folder" / "session.json"),
            (str(tmp_path / "saved.json"), tmp_path / "saved.json"),
        ):
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen.query("#prompt-input"), timeout=10)
            inp = app.screen.query_one("#prompt-input")
            inp.value = typed
            await pilot.press("enter")
            await wait_for(pilot, lambda expect=expect: expect.exists(), timeout=10)
            await wait_for(
                pilot,
                lambda expect=expect: any(f"session saved to {expect}" in str(n.message) for n in app._notifications),
                timeout=10,
            )
        # ... or why it could not
        (tmp_path / "plainfile").write_text("x")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen.query("#prompt-input"), timeout=10)
        app.screen.query_one("#prompt-input").value = str(tmp_path / "plainfile" / "s.json")
        await pilot.press("enter")
        await wait_for(
            pilot,
            lambda: any("cannot write" in str(n.message) and "plainfile" in str(n.message) for n in app._notifications),
            timeout=10,
        )
    saved = tmp_path / "saved.json"
    assert json.loads(saved.read_text())["status"] == "done"
    # reopen it in a fresh lab
    app2 = make_app(loaded, tmp_path, data_dir, session_path=saved)
    async with app2.run_test(size=SIZE) as pilot:
        await wait_for(
            pilot,
            lambda: (
                app2.lab.session is not None
                and app2.query("#results-table")
                and app2.query_one("#results-table").row_count == 3
            ),
            timeout=20,
        )
        assert app2.lab.session.id == s.id
        assert app2.query_one("#results-table").row_count == 3
        assert app2.query_one("#tabs").active == "results"
        form = app2.query_one("#form")
        await wait_for(pilot, lambda: form.query("#width-ratio"), timeout=10)
        assert form.query_one("#width-ratio").value == "2:4"


async def test_cancel_leaves_a_valid_session(loaded, tmp_path, data_dir):
    from frankenlab.pipeline import events as ev
    from frankenlab.sessions import record_run

    reached, gate = threading.Event(), threading.Event()

    def runner(recipe, out, *, listener, **kw):
        def hold(e):
            listener(e)
            if isinstance(e, ev.StageStarted) and e.stage == 1:
                reached.set()
                gate.wait(30)  # the test presses x meanwhile

        return record_run(recipe, out, listener=hold, **kw)

    app = make_app(loaded, tmp_path, data_dir, runner=runner)
    async with app.run_test(size=SIZE) as pilot:
        app._show_recipe(short_recipe())
        toasts, notify = [], app.notify
        app.notify = lambda message, **kw: (toasts.append(message), notify(message, **kw))[1]
        await pilot.press("ctrl+r")
        await wait_for(pilot, reached.is_set)
        await pilot.press("3", "ctrl+x")  # the lab stays interactive while the run holds
        assert app.lab.cancel.is_set()
        gate.set()
        await wait_for(pilot, lambda: not app.lab.running, timeout=60)
        await pilot.pause()
        assert len(toasts) == 1 and toasts[0].startswith("run cancelled (0 finished stage(s) kept)"), toasts
        s = app.lab.session
        assert s.status == "cancelled"
        assert s.stages[0].status == "done" and s.stages[0].metric("perplexity")
        on_disk = json.loads(Path(s.path).read_text())
        assert on_disk["status"] == "cancelled"
        assert app.query_one("#resultspanel").rows[1].status == "cancelled"
        assert [e["event"] for e in on_disk["events"]][-2:] == ["RunCancelled", "RunFinished"]


async def test_live_results_come_from_stage_records(loaded, tmp_path, data_dir, monkeypatch):
    """While a run goes, footprints, stage models and memory bars come from StageFinished.record;
    the lab never reads the session file the run is writing."""
    from frankenlab.pipeline import events as ev
    from frankenlab.sessions import record_run
    from frankenlab.tui import app_files, app_run, lab_state

    reads = []
    for module in (lab_state, app_run, app_files):
        monkeypatch.setattr(module, "load_session", lambda p, real=module.load_session: reads.append(p) or real(p))
    reached, gate = threading.Event(), threading.Event()

    def runner(recipe, out, *, listener, **kw):
        def hold(e):
            listener(e)
            if isinstance(e, ev.StageStarted) and e.stage == 2:
                reached.set()
                gate.wait(30)  # stage 1 is finished and recorded; the run waits for the test

        return record_run(recipe, out, listener=hold, **kw)

    app = make_app(loaded, tmp_path, data_dir, runner=runner)
    async with app.run_test(size=SIZE) as pilot:
        app._show_recipe(short_recipe())
        await pilot.press("ctrl+r")
        await wait_for(pilot, reached.is_set)
        panel = app.query_one("#resultspanel")
        await wait_for(pilot, lambda: 1 in panel.rows and panel.rows[1].footprint is not None, timeout=30)
        assert app.lab.running and app.lab.session.stages[1].artifact
        assert "stage 1 depth" in [t.label for t in app.chat_targets().values()]
        assert "stage 1 depth" in app.query_one("#memory").footprints
        gate.set()
        await wait_for(pilot, lambda: not app.lab.running, timeout=60)
        assert app.lab.session.status == "done" and app.lab.session.path
    assert not reads


async def test_chat_streams_and_ab(loaded, tmp_path, data_dir, monkeypatch):
    import frankenlab.tui.widgets.chat_panel as chat_panel

    pieces = []
    real_stream = chat_panel.stream_reply

    def counting_stream(*args, **kwargs):  # every piece the worker forwards to the screen
        for piece in real_stream(*args, **kwargs):
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(chat_panel, "stream_reply", counting_stream)
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await pilot.pause()
        chat = app.query_one("#chatpanel")
        chat.query_one("#chat-input").focus()
        await pilot.pause()
        await pilot.press(*"hello", "enter")
        await wait_for(pilot, lambda: chat.query(".msg.stats") or chat.query(".msg.error"), timeout=120)
        assert not chat.query(".msg.error")
        assert len(pieces) >= 2, "the reply must arrive piece by piece"
        reply = chat.query("#transcript-a .assistant").last()
        assert "".join(pieces).strip() and "".join(pieces).strip()[:5] in str(reply.render())
        assert [m["role"] for m in chat.history] == ["user", "assistant"]
        stats = str(chat.query("#transcript-a .msg.stats").last().render())
        n = int(stats.split()[0])
        assert "tokens," in stats and "pieces" not in stats and "greedy" in stats and 1 <= n <= 8, stats
        # sampling settings: a bad value is refused with a message, a good one is used and said
        chat.query_one("#chat-temp").value = "warm"
        chat.send("x")
        await wait_for(pilot, lambda: any("temp must be a number" in str(m.message) for m in app._notifications))
        chat.query_one("#chat-temp").value = "0.7"
        chat.query_one("#chat-topp").value = "0.9"
        chat.send("again")
        await wait_for(pilot, lambda: len(chat.query("#transcript-a .msg.stats")) == 2, timeout=120)
        assert "temperature 0.7, top-p 0.9" in str(chat.query("#transcript-a .msg.stats").last().render())
        chat.query_one("#chat-temp").value = "0"
        chat.action_new_chat()
        await pilot.pause()
        # A/B: baseline against the grid's plan, side by side
        app.query_one("#grid").toggle(0)  # (digits would go into the focused chat input)
        await pilot.pause()
        chat.select(a="base", b="plan", ab=True)
        await pilot.pause()
        chat.query_one("#chat-input").focus()
        await pilot.press(*"hi", "enter")
        await wait_for(
            pilot,
            lambda: (
                len(chat.query("#transcript-b .msg.stats")) == 1 and len(chat.query("#transcript-a .msg.stats")) == 1
            ),
            timeout=120,
        )
        assert chat.query_one("#transcript-b").display


async def test_model_that_cannot_load_keeps_the_app(tmp_path, data_dir):
    from frankenlab.tui.app import create_app

    app = create_app(model_ref=str(tmp_path / "missing-model"), data_dir=data_dir, runs_dir=tmp_path, whatif=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications), timeout=30)
        assert app.lab.loaded is None
        await pilot.press("ctrl+r")  # refused with a notification, nothing crashes
        await pilot.pause()
        assert "could not be loaded" in str(app.query_one("#model-info").render())


async def test_failing_stage_and_missing_data_are_reported(loaded, tmp_path):
    app = make_app(loaded, tmp_path, tmp_path / "no-data")
    async with app.run_test(size=SIZE) as pilot:
        app._show_recipe(short_recipe())
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.lab.session is not None and not app.lab.running, timeout=60)
        assert app.lab.session.status == "failed"
        assert any(n.severity == "error" for n in app._notifications)
        app.action_tab("layers")  # still interactive
        await pilot.pause()
        grid = app.query_one("#grid")
        grid.focus()
        await wait_for(pilot, lambda: app.focused is grid, timeout=10)
        await pilot.press("space")
        await wait_for(pilot, lambda: sum(grid.counts) == len(grid.counts) - 1, timeout=10)


async def test_gptq_that_fails_inside_gptqmodel_leaves_the_lab_running(loaded, tmp_path, data_dir, monkeypatch):
    """gptqmodel's worker threads os._exit(1) on any error: the gptq stage runs in a worker process,
    so the lab lives on and the session says failed, with the reason and the worker's log
    (FRANKENLAB_TEST_FAIL_IN_GPTQ makes every GPTQ task raise there: pipeline.quant)."""
    from dataclasses import replace

    from frankenlab.pipeline.recipe import StageSpec
    from frankenlab.pipeline.stages import gptq

    monkeypatch.setenv("FRANKENLAB_TEST_FAIL_IN_GPTQ", "broken on purpose")
    recipe = replace(
        short_recipe(), stages=[StageSpec("gptq", gptq.Config(group_size=32, samples=4, seq_len=32, batch_size=2))]
    )
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        app._show_recipe(recipe)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.lab.session is not None and not app.lab.running, timeout=600)
        s = app.lab.session
        assert s.status == "failed" and s.stages[0].status == "done"
        error = s.stages[1].error
        assert "RuntimeError: broken on purpose (injected by FRANKENLAB_TEST_FAIL_IN_GPTQ)" in error, error
        assert "01-gptq.log" in error and "\n" not in error
        assert json.loads(Path(s.path).read_text())["status"] == "failed"
        assert any(n.severity == "error" for n in app._notifications)
        assert app.is_running
        app.action_tab("layers")  # still interactive
        await pilot.pause()
        grid = app.query_one("#grid")
        grid.focus()
        await wait_for(pilot, lambda: app.focused is grid, timeout=10)
        await pilot.press("space")
        await wait_for(pilot, lambda: sum(grid.counts) == len(grid.counts) - 1, timeout=10)


async def test_help_palette_and_sessions_compare(loaded, tmp_path, data_dir):
    from frankenlab.sessions.session import Session, StageRecord

    for i, ppl in enumerate((20.0, 30.0)):
        s = Session(
            recipe={"name": f"r{i}"},
            status="done",
            stages=[
                StageRecord(
                    0,
                    "baseline",
                    "baseline",
                    status="done",
                    metrics=[{"name": "perplexity", "value": ppl, "protocol": "p"}],
                )
            ],
        )
        s.save(tmp_path / "runs" / f"r{i}" / "session.json")
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for t in (
            "Run the recipe",
            "Cancel the run",
            "Save the session as",
            "Open a session",
            "Chat A/B",
            "Load a recipe",
            "Write the recipe",
            "Importance scan",
        ):
            assert t in titles
        await pilot.press("6")
        await pilot.pause()
        sl = app.query_one("#sessions-list")
        assert sl.option_count == 2
        sl.select_all()
        await pilot.click("#sess-compare")
        await pilot.pause()
        assert type(app.screen).__name__ == "CompareScreen"
        assert app.screen.query_one("#compare-table").row_count == 2


async def test_form_keeps_the_fields_it_does_not_show(loaded, tmp_path, data_dir):
    """Loading a recipe into the form and building it again must not reset what the form hides."""
    from frankenlab.pipeline.recipe import Recipe, StageSpec
    from frankenlab.pipeline.stages import depth, lora, width

    recipe = Recipe(
        name="hidden",
        stages=[
            StageSpec("depth", depth.Config(k=1, metric="l1", protected_first=1, protected_last=1, samples=3)),
            StageSpec(
                "width", width.Config(pattern="2:4", targets=("q_proj", "up_proj"), batch_size=4, sequential="layer")
            ),
            StageSpec("lora", lora.Config(steps=2, lr=1e-3, targets=("q_proj", "v_proj"), merge=False)),
        ],
    )
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        form = app.query_one("#form")
        form.load(recipe)
        await pilot.pause()
        built = form.build()
        d, w = built.stages[0].config, built.stages[1].config
        assert (d.k, d.metric, d.samples, d.protected_first) == (1, "l1", 3, 1)
        assert (w.n, w.m, w.targets, w.batch_size, w.sequential) == (2, 4, ("q_proj", "up_proj"), 4, "layer")
        r = built.stages[2].config
        assert (r.steps, r.lr, r.targets, r.merge) == (2, 1e-3, ("q_proj", "v_proj"), False)


async def test_fast_tab_keys_end_on_the_last_tab_asked_for(loaded, tmp_path, data_dir):
    """Issue 14: `5 4 5 3` pressed quickly, while a worker posts log lines, left the lab switching
    between Results and Run forever (pending focus calls switched each other's tab back)."""
    from textual.widgets import TabbedContent

    from frankenlab.tui.widgets.run_panel import RunPanel

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        tabs = app.query_one(TabbedContent)
        stop = threading.Event()

        def chatter():  # a worker posting events the whole time
            while not stop.is_set():
                app.call_from_thread(app.query_one(RunPanel).write, "tick", "dim")
                stop.wait(0.01)

        worker = threading.Thread(target=chatter, daemon=True)
        worker.start()
        try:
            for keys in (("5", "4", "5", "3"), ("4", "5", "1", "2", "5", "4"), ("2", "5", "3", "4")):
                # alt+N: plain digits are text once the chat prompt has focus (that is wanted)
                await pilot.press(*(f"alt+{k}" for k in keys))
                last = {"1": "layers", "2": "recipe", "3": "run", "4": "results", "5": "chat"}[keys[-1]]
                # wait for the state, not a moment: on a loaded machine the last switch can still be
                # queued when focus first sits inside some tab (a CI run saw 'run' there, then 'results')
                await wait_for(
                    pilot,
                    lambda last=last: (
                        tabs.active == last
                        and app.focused is not None
                        and tabs.active in {a.id for a in app.focused.ancestors_with_self}
                    ),
                )
                seen = set()
                for _ in range(20):  # it stays: nothing switches it back later
                    await pilot.pause(0.02)
                    seen.add(tabs.active)
                assert seen == {last}
        finally:
            stop.set()
            await wait_for(pilot, lambda: not worker.is_alive())  # it waits on the loop: never join() here
        await pilot.press("5")  # the pane does not grab the keys: focus goes to the transcript, not the prompt
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "transcript-a")
        app.query_one("#chat-input").focus()
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "chat-input")
        await pilot.press("question_mark")  # typed in the chat prompt: text, not Help
        await pilot.pause()
        assert len(app.screen_stack) == 1 and "?" in app.query_one("#chat-input").value


async def test_footer_at_80x24_shows_run_and_help_on_every_pane(loaded, tmp_path, data_dir):
    from textual.widgets import TabbedContent
    from textual.widgets._footer import FooterKey

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        tabs = app.query_one(TabbedContent)
        for key, pane in zip("123456", ("layers", "recipe", "run", "results", "chat", "sessions"), strict=False):
            await pilot.press(f"alt+{key}")
            await wait_for(
                pilot,
                lambda pane=pane: (
                    tabs.active == pane
                    and app.focused is not None
                    and pane in {a.id for a in app.focused.ancestors_with_self}
                ),
            )
            await pilot.pause()
            keys = list(app.query(FooterKey))
            palette = [fk for fk in keys if fk.action.endswith("command_palette")]
            edge = palette[0].region.x if palette else 80  # the palette key is docked over the right end
            shown = {fk.action for fk in keys if fk.region.width > 0 and fk.region.right <= edge and fk.region.y == 23}
            assert {"run", "cancel_run", "help"} <= {a.split(".")[-1] for a in shown}, (pane, shown)


async def test_checkbox_glyph_differs_on_and_off_in_plain_text(loaded, tmp_path, data_dir):
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#chat-ab")
        off = str(box.render())
        box.value = True
        await pilot.pause()
        on = str(box.render())
        assert off != on and "X" in on and "X" not in off


async def test_footer_recomposes_only_when_its_keys_change():
    """LabFooter: focus moving between widgets with the same keys leaves the footer alone (Textual's
    Footer rebuilt itself on every focus change, a large part of a tab switch's cost); a widget
    with other keys still changes what it shows, and every key is born compact."""
    from textual.app import App
    from textual.binding import Binding
    from textual.widgets import Button
    from textual.widgets._footer import FooterKey

    from frankenlab.tui.widgets.footer import LabFooter

    class Special(Button):
        BINDINGS = [Binding("x", "special", "Special key")]

        def action_special(self) -> None:
            pass

    class Mini(App):
        BINDINGS = [Binding("ctrl+r", "noop", "Run")]

        def compose(self):
            yield Button("a", id="a")
            yield Button("b", id="b")
            yield Special("c", id="c")
            yield LabFooter(compact=True)

        def action_noop(self) -> None:
            pass

    app = Mini()
    async with app.run_test(size=(80, 10)) as pilot:
        footer = app.query_one(LabFooter)
        builds = []
        original = footer.recompose

        async def counting():
            builds.append(1)
            await original()

        footer.recompose = counting
        app.query_one("#a").focus()
        await pilot.pause(0.2)
        builds.clear()
        for target in ("#b", "#a", "#b"):
            app.query_one(target).focus()
            await pilot.pause(0.1)
        assert builds == []
        app.query_one("#c").focus()
        await pilot.pause(0.2)
        assert builds, "the footer must show the focused widget's own keys"
        labels = [k.description for k in footer.query(FooterKey)]
        assert "Special key" in labels and "Run" in labels
        assert all(k.has_class("-compact") for k in footer.query(FooterKey))
