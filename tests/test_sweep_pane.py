"""The lab's Sweep pane with Pilot: launch a sweep file in the background, rows fill, a row opens its session."""

from __future__ import annotations

import pytest
import torch

from frankenlab.tui.cli.main import _quiet_libraries
from tests.test_sweep import sweep_text

_quiet_libraries()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


async def wait_for(pilot, cond, timeout=180.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached in time")


async def test_sweep_pane_runs_and_opens_a_row(loaded, tiny_model_dir, tmp_path, data_dir):
    from textual.widgets import DataTable, Input, TabbedContent

    from frankenlab.tui.app import create_app
    from frankenlab.tui.widgets.sweep_pane import SweepPane

    f = tmp_path / "grid.toml"
    f.write_text(sweep_text(tiny_model_dir, '"width.pattern" = ["1:8", "2:4"]'))
    app = create_app(
        loaded=loaded,
        model_ref=loaded.source.ref,
        data_dir=data_dir,
        runs_dir=tmp_path / "runs",
        chat_tokens=8,
        whatif=False,
    )
    async with app.run_test(size=(120, 44)) as pilot:
        await pilot.press("7")
        assert app.query_one(TabbedContent).active == "sweep"
        pane = app.query_one(SweepPane)
        app.query_one("#sweep-file", Input).value = "no-such-sweep"
        await pilot.click("#sweep-launch")
        await pilot.pause()
        assert not pane.running, "a missing file is refused with a message, nothing starts"
        app.clear_notifications()  # the refusal's toast must not sit over the button clicked next
        await pilot.pause()
        app.query_one("#sweep-file", Input).value = str(f)
        # Check lists every configuration in the pane's log
        await pilot.click("#sweep-check")
        log = app.query_one("#sweep-log")
        await wait_for(pilot, lambda: len(log.lines) >= 3, timeout=20)
        text = "\n".join(line.text for line in log.lines)
        assert "1  width.pattern=1:8" in text and "2  width.pattern=2:4" in text, text
        # Launch asks first: "no" starts nothing, "yes" starts the sweep
        from frankenlab.tui.screens.confirm import ConfirmScreen

        await pilot.click("#sweep-launch")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=20)
        assert "2 configuration(s)" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen), timeout=20)
        assert not pane.running and pane.out is None
        await pilot.click("#sweep-launch")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=20)
        await pilot.press("y")
        # the tiny sweep can finish within a frame: wait for its end, not for a glimpse of it running
        await wait_for(pilot, lambda: not pane.running and "sweep done" in str(app.query_one("#sweep-status").render()))
        table = app.query_one("#sweep-table", DataTable)
        assert table.row_count == 2 and set(pane.rows) == {1, 2}
        assert (tmp_path / "runs" / "sweep-tiny-sweep" / "sweep.json").is_file()
        assert (tmp_path / "runs" / "sweep-tiny-sweep" / "tables" / "pareto.svg").is_file()
        status = str(app.query_one("#sweep-status").render())
        assert "sweep done: 2 configuration(s)" in status
        pareto = str(app.query_one("#sweep-pareto").render())
        assert "front:" in pareto
        png = tmp_path / "runs" / "sweep-tiny-sweep" / "tables" / "pareto.png"
        assert png.is_file() and f"figure: {png} (and pareto.svg)" in pareto  # the pane says where the figure is
        table.focus()
        table.move_cursor(row=1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.query_one(TabbedContent).active == "results")
        assert app.lab.session is not None and "width.pattern=2:4" in app.lab.session.recipe["name"]
