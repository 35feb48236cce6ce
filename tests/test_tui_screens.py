"""Screens that say what they mean: the run log, memory bars, the sessions list, compare, the footer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from frankenlab.tui.cli.main import _quiet_libraries

_quiet_libraries()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def make_app(loaded, tmp_path, data_dir, **kw):
    from frankenlab.tui.app import create_app

    return create_app(
        loaded=loaded, model_ref=loaded.source.ref, data_dir=data_dir, runs_dir=tmp_path / "runs", whatif=False, **kw
    )


async def wait_for(pilot, cond, timeout=60.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached in time")


def shown_text(static, width: int = 120) -> str:
    """What a Static shows, as plain text."""
    from rich.console import Console

    console = Console(width=width, color_system=None)
    with console.capture() as cap:
        console.print(static.content)
    return cap.get()


def session_with(path: Path, *, status: str, stage_statuses: list[str], seconds=(1.0, 2.0, 3.0)):
    from frankenlab.sessions.session import Session, StageRecord

    kinds = ["baseline", "depth", "width"]
    stages = [
        StageRecord(
            i,
            kinds[i],
            kinds[i],
            {"k": 1} if kinds[i] == "depth" else {"pattern": "2:4"} if kinds[i] == "width" else {},
            status=st,
            seconds=seconds[i],
            metrics=[{"name": "perplexity", "value": 20.0 + i, "protocol": "wikitext2-concat-64:first2"}]
            if st == "done"
            else [],
        )
        for i, st in enumerate(stage_statuses)
    ]
    recipe = {"name": "cut", "stages": [{"kind": "depth", "k": 1}, {"kind": "width", "pattern": "2:4"}]}
    s = Session(recipe=recipe, stages=stages, status=status)
    s.save(path)
    return s


# -- the run log -------------------------------------------------------------------------------------
def test_lab_log_shows_our_warnings_and_any_error_not_third_party_warnings():
    from frankenlab.tui.messages import AppLogHandler, LogWritten

    posted = []

    class App:
        def post_message(self, m):
            posted.append(m)

    handler = AppLogHandler(App())
    for name, level in (
        ("torchao", logging.WARNING),  # "Failed to load ..._C_mxfp8...so"
        ("torchao.kernel.intmm", logging.WARNING),  # "Detected no triton"
        ("frankenlab.pipeline.runner", logging.WARNING),
        ("torchao", logging.ERROR),
    ):
        handler.handle(logging.LogRecord(name, level, __file__, 1, f"{name} says", None, None))
    assert [m.text for m in posted if isinstance(m, LogWritten)] == ["frankenlab.pipeline.runner says", "torchao says"]


def test_stage_settings_only_the_fields_that_apply():
    from frankenlab.tui.widgets.run_panel import settings_text

    ranked = {"k": 2, "metric": "perplexity", "protected_first": 4, "protected_last": 2, "samples": 8}
    assert settings_text("depth", {**ranked, "layers": None, "plan": None}) == (
        "k=2, metric=perplexity, protected_first=4, protected_last=2, samples=8"
    )
    assert settings_text("depth", {**ranked, "layers": None, "plan": "0-3,5,5,6-29"}) == "plan=0-3,5,5,6-29"
    assert settings_text("depth", {**ranked, "metric": "l1", "plan": None}) == (
        "k=2, metric=l1, protected_first=4, protected_last=2"
    )
    assert settings_text("gptq", {"bits": 4, "damp_percent": 0.05, "samples": None}) == "bits=4, damp_percent=0.05"
    assert settings_text("baseline", {}) == ""


async def test_run_log_wraps_long_lines_without_losing_characters(loaded, tmp_path, data_dir):
    """At 80 columns a long line wraps inside the log's region: every character stays visible."""
    from frankenlab.tui.widgets.run_panel import RunPanel

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await wait_for(pilot, lambda: app.query_one("#tabs").active == "run")
        panel = app.query_one(RunPanel)
        words = " ".join(f"w{i:03d}" for i in range(60))  # 299 characters, several wrapped lines
        for _ in range(30):  # enough lines for the scrollbar to show
            panel.write(words)
        log = panel.log_widget  # its writes render once its size is known: on a loaded machine, later
        await wait_for(pilot, lambda: len(log.lines) >= 30)
        await pilot.pause()
        width = log.scrollable_content_region.width
        assert width > 0 and all(line.cell_length <= width for line in log.lines)
        shown = " ".join("".join(seg.text for seg in line).strip() for line in log.lines[: len(log.lines) // 30])
        assert shown.split() == words.split()


# -- memory ------------------------------------------------------------------------------------------
def test_budget_bars_tell_a_5x_miss_from_a_100x_miss():
    from frankenlab.tui.widgets.memory import budget_bar

    def red(factor):
        t = budget_bar(factor)
        after = t.plain.split("│", 1)[1]
        return after.count("█")

    assert red(0.5) == 0 and budget_bar(0.5).plain.count("█") == 4  # half the budget: half the 8 cells
    assert red(5.5) == 3 and red(113.8) == 8 and red(1000) == 12
    assert budget_bar(5000).plain.rstrip().endswith("»")  # off the scale, said so
    assert len({len(budget_bar(f).plain) for f in (0.1, 1, 5.5, 113.8, 5000)}) == 1  # one width, aligned


def test_cache_line_says_context_and_dtype():
    from frankenlab.tui.widgets.memory import cache_label

    cache = {"layers": 30, "kv_heads": 3, "head_dim": 64, "context": 2048, "batch": 1, "dtype": "float32"}
    assert cache_label(cache) == "KV cache at 2048 tokens, fp32"
    assert cache_label({**cache, "dtype": "bfloat16", "batch": 4}) == "KV cache at 2048 tokens, bf16, batch 4"
    assert cache_label(None) == "KV cache"


async def test_memory_menu_has_one_entry_per_model_state(loaded, tmp_path, data_dir):
    from textual.widgets import Select

    from tests.test_tui_snapshots import fixed_session

    app = make_app(loaded, tmp_path, data_dir, session_path=fixed_session(tmp_path / "s" / "session.json"))
    async with app.run_test(size=(120, 40)) as pilot:
        memory = app.query_one("#memory")
        await wait_for(pilot, lambda: memory.live is not None and "stage 2 width" in memory.footprints)
        sel = app.query_one("#memory-state", Select)
        options = [str(label) for label, _ in sel._options]
        assert options == ["baseline", "stage 1 depth", "stage 2 width"], options  # no blank, no "stage 0 baseline"
        from textual.widgets._select import SelectCurrent

        shown = sel.query_one(SelectCurrent)
        await wait_for(pilot, lambda: str(shown.label) == "stage 2 width")  # the menu shows the entry it holds
        sel.value = "baseline"
        await wait_for(pilot, lambda: str(shown.label) == "baseline")
        sel.value = "stage 2 width"
        await pilot.pause()
        text = shown_text(app.query_one("#memory-bars"))
        assert "weights + runtime" in text and "KV cache" in text
        assert app.query_one("#results-table").columns  # Results says "memory" for weights + runtime, too
        titles = [str(c.label) for c in app.query_one("#results-table").columns.values()]
        assert "memory" in titles and "footprint" not in titles


async def test_memory_menu_names_the_baseline_once_measured(loaded, tmp_path, data_dir):
    from textual.widgets._select import SelectCurrent

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        memory = app.query_one("#memory")
        await wait_for(pilot, lambda: memory.live is not None)
        shown = app.query_one("#memory-state").query_one(SelectCurrent)
        await wait_for(pilot, lambda: str(shown.label) == "baseline")  # not "baseline (measuring…)" any more


# -- sessions ----------------------------------------------------------------------------------------
def test_session_label_counts_as_the_cli_and_shows_perplexity(tmp_path):
    from frankenlab.sessions.store import list_sessions
    from frankenlab.tui.widgets.sessions_panel import session_label

    session_with(
        tmp_path / "runs" / "a" / "session.json", status="cancelled", stage_statuses=["done", "done", "cancelled"]
    )
    (entry,) = list_sessions([tmp_path / "runs"])
    label = session_label(entry).plain
    assert "cancelled 1/2    21.00 (wikitext2-concat-64:first2)" in label, label


async def test_sessions_opened_or_saved_elsewhere_stay_listed(loaded, tmp_path, data_dir):
    from frankenlab.sessions.store import recent_sessions, recent_sessions_file

    elsewhere = tmp_path / "far" / "away" / "deep" / "down" / "mine.json"
    session_with(elsewhere, status="done", stage_statuses=["done", "done", "done"])
    app = make_app(loaded, tmp_path, data_dir, session_path=elsewhere)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.lab.session is not None)
        listed = app.query_one("#sessions-list")
        await wait_for(pilot, lambda: listed.option_count == 1)
        assert Path(listed.get_option_at_index(0).value).resolve() == elsewhere.resolve()
        listed.highlighted = 0  # the highlighted session's full path shows under the list
        detail = app.query_one("#sessions-detail")
        await wait_for(pilot, lambda: str(elsewhere) in shown_text(detail, width=300))
    assert recent_sessions() == [elsewhere.resolve()]
    assert recent_sessions_file().parent.name == "frankenlab"  # under the user's data folder
    # a later lab (another day) still lists it; a file that is gone is dropped quietly
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        listed = app.query_one("#sessions-list")
        await wait_for(pilot, lambda: listed.option_count == 1)
    elsewhere.unlink()
    assert recent_sessions() == []
    recent_sessions_file().write_text("{broken")
    assert recent_sessions() == []


# -- compare -----------------------------------------------------------------------------------------
def test_compare_keeps_finished_stages_done_and_per_stage_seconds(tmp_path):
    from frankenlab.sessions.compare import compare_rows

    s = session_with(tmp_path / "a.json", status="cancelled", stage_statuses=["done", "done", "cancelled"])
    rows = compare_rows([s], all_stages=True)
    assert [r["status"] for r in rows] == ["done", "done"]  # a finished stage is never "cancelled"
    assert [r["seconds (stage)"] for r in rows] == [1.0, 2.0]  # its own time, not the run's so far
    (row,) = compare_rows([s])
    assert row["status"] == "done (run cancelled)"


async def test_compare_screen_shows_perplexity_with_protocol_at_120_columns(loaded, tmp_path, data_dir):
    from frankenlab.tui.screens.compare import CompareScreen

    a = session_with(tmp_path / "a.json", status="done", stage_statuses=["done", "done", "done"])
    b = session_with(tmp_path / "b.json", status="cancelled", stage_statuses=["done", "done", "cancelled"])
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        app.push_screen(CompareScreen([a, b]))
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.query("#compare-table"))
        table = app.screen.query_one("#compare-table")
        await wait_for(pilot, lambda: table.row_count == 5)
        columns = list(table.columns.values())
        x = 0
        for c in columns:
            if str(c.label).startswith("PPL"):
                break
            x += c.get_render_width(table)
        assert str(c.label) == "PPL [wikitext2-concat-64:first2]"
        assert x + c.get_render_width(table) <= table.size.width  # on screen without scrolling
        statuses = [table.get_row_at(i)[2] for i in range(table.row_count)]
        assert "cancelled" not in statuses


# -- elsewhere ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pane", ["1", "2", "5"])
async def test_footer_shows_whole_keys_at_60_columns(loaded, tmp_path, data_dir, pane):
    from textual.widgets._footer import FooterKey

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(60, 24)) as pilot:
        await pilot.press(pane)
        await pilot.pause()
        footer = app.query_one("LabFooter")
        palette = next(k for k in footer.query(FooterKey) if k.has_class("-command-palette"))

        def whole() -> bool:
            shown = [k for k in footer.children if k.display and k is not palette]
            return bool(shown) and all(k.region.right <= palette.region.x for k in shown)

        await wait_for(pilot, whole, timeout=60)


def test_model_info_names_the_bundled_model_once(loaded):
    from dataclasses import replace

    from frankenlab.pipeline.loading import ModelSource
    from frankenlab.tui.widgets.model_info import ModelInfo

    info = ModelInfo()
    shown = []
    info.update = lambda t: shown.append(str(t))
    info.show(replace(loaded, source=ModelSource("default", "default", "/x/model.gguf", "SmolLM2")))
    assert "(bundled default)" in shown[-1] and "default: default" not in shown[-1]
    info.show(replace(loaded, source=ModelSource("folder", "models/tiny", "/m/tiny", "tiny")))
    assert "(HF folder: models/tiny)" in shown[-1]
