"""Keys never get trapped (digits, esc, pane keys that reach Textual while typing), ctrl+c and quit
during a run, and A/B chat like for like (one conversation, one model at a time, a stop says so)."""

from __future__ import annotations

import threading

import pytest
from textual.widgets import Input, TabbedContent

from tests.test_tui import SIZE, make_app, short_recipe, wait_for


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def focused_id(app) -> str | None:
    return app.focused.id if app.focused is not None else None


async def on_pane(pilot, pane: str) -> None:
    tabs = pilot.app.query_one(TabbedContent)
    try:
        await wait_for(pilot, lambda: tabs.active == pane, timeout=10)
    except AssertionError:
        raise AssertionError(
            f"pane {tabs.active!r} shown, {pane!r} expected (focus: {focused_id(pilot.app)})"
        ) from None
    await pilot.pause()


def test_pane_keys_reach_textual_as_sent_by_common_terminals():
    """What xterm, tmux (xterm-keys, the default), GNOME Terminal and iTerm2 send for ctrl+pageup/down
    arrives as those keys; alt+digit sent as ESC + digit does not arrive as alt+digit (hence not the
    keys the lab relies on while typing)."""
    from textual._xterm_parser import XTermParser

    def keys(seq: str) -> list[str]:
        return [e.key for e in XTermParser().feed(seq) if hasattr(e, "key")]

    assert keys("\x1b[5;5~") == ["ctrl+pageup"]
    assert keys("\x1b[6;5~") == ["ctrl+pagedown"]
    assert keys("\x1b1") != ["alt+1"]


async def test_digits_and_esc_in_chat(loaded, tmp_path, data_dir):
    from textual.widgets._footer import FooterKey

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await on_pane(pilot, "chat")
        assert not isinstance(app.focused, Input), "the chat pane must not grab the keys on arrival"
        await pilot.press("1")  # a digit switches panes: it is not typed anywhere
        await on_pane(pilot, "layers")
        assert app.query_one("#chat-input").value == ""
        await pilot.press("5")
        await on_pane(pilot, "chat")
        app.query_one("#chat-input").focus()
        await wait_for(pilot, lambda: focused_id(app) == "chat-input")
        await pilot.press("6")  # while typing, a digit is text
        assert app.query_one("#chat-input").value == "6" and app.query_one(TabbedContent).active == "chat"
        shown = {k.description for k in app.query(FooterKey)}
        assert "Leave input (esc again: stop reply)" in shown, shown  # the footer says what esc does
        await pilot.press("escape")  # esc always leaves the field
        await wait_for(pilot, lambda: focused_id(app) == "transcript-a")
        assert "Stop reply" in {k.description for k in app.query(FooterKey)}
        await pilot.press("6")
        await on_pane(pilot, "sessions")
        # esc leaves the sampling fields too
        await pilot.press("5")
        await on_pane(pilot, "chat")
        app.query_one("#chat-temp").focus()
        await wait_for(pilot, lambda: focused_id(app) == "chat-temp")
        await pilot.press("escape", "2")
        await on_pane(pilot, "recipe")


async def test_digits_and_esc_in_sweep(loaded, tmp_path, data_dir):
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("7")
        await on_pane(pilot, "sweep")
        await wait_for(pilot, lambda: app.focused is not None)
        assert not isinstance(app.focused, Input), "the sweep pane must not focus its file field on arrival"
        await pilot.press("1")
        await on_pane(pilot, "layers")
        assert app.query_one("#sweep-file").value == ""
        await pilot.press("7")
        await on_pane(pilot, "sweep")
        app.query_one("#sweep-file").focus()
        await wait_for(pilot, lambda: focused_id(app) == "sweep-file")
        await pilot.press("d", "3", "escape")
        await wait_for(pilot, lambda: not isinstance(app.focused, Input))
        await pilot.press("3")
        await on_pane(pilot, "run")
        assert app.query_one("#sweep-file").value == "d3"


async def test_ctrl_pagedown_and_pageup_switch_panes_while_typing(loaded, tmp_path, data_dir):
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await on_pane(pilot, "chat")
        app.query_one("#chat-input").focus()
        await wait_for(pilot, lambda: focused_id(app) == "chat-input")
        await pilot.press("h", "ctrl+pagedown")
        await on_pane(pilot, "sessions")
        await pilot.press("ctrl+pageup", "ctrl+pageup")
        await on_pane(pilot, "results")
        for _ in range(4):  # wraps around: as many panes as there are
            await pilot.press("ctrl+pageup")
        await on_pane(pilot, "plan")
        await pilot.press("ctrl+pageup")
        await on_pane(pilot, "sweep")
        assert app.query_one("#chat-input").value == "h"


async def test_ctrl_c_cancels_a_run_and_quit_asks_first(loaded, tmp_path, data_dir):
    from frankenlab.pipeline import events as ev
    from frankenlab.sessions import record_run
    from frankenlab.tui.screens.confirm import ConfirmScreen

    reached, gate = threading.Event(), threading.Event()

    def runner(recipe, out, *, listener, **kw):
        def hold(e):
            listener(e)
            if isinstance(e, ev.StageStarted) and e.stage == 1:
                reached.set()
                gate.wait(30)

        return record_run(recipe, out, listener=hold, **kw)

    app = make_app(loaded, tmp_path, data_dir, runner=runner)
    async with app.run_test(size=SIZE) as pilot:
        app._show_recipe(short_recipe())
        await pilot.press("ctrl+r")
        await wait_for(pilot, reached.is_set)
        await pilot.press("ctrl+q")  # quitting during a run asks first
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        assert app.is_running and app.lab.running and not app.lab.cancel.is_set()
        await pilot.press("ctrl+c")  # the first ctrl+c cancels the run, as in `frankenlab run`
        assert app.lab.cancel.is_set()
        gate.set()
        await wait_for(pilot, lambda: not app.lab.running, timeout=60)
        assert app.lab.session.status == "cancelled"
        assert app.is_running


async def test_ab_shares_one_conversation_one_model_at_a_time(loaded, tmp_path, data_dir, monkeypatch):
    import frankenlab.tui.widgets.chat_panel as chat_panel

    calls = []  # (label, messages, start order, end order)
    order = []
    real = chat_panel.stream_reply

    def recording(model, tokenizer, messages, *, plan=None, **kw):
        label = "plan" if plan is not None else "base"
        calls.append((label, [dict(m) for m in messages]))
        order.append(("start", label))
        yield from real(model, tokenizer, messages, plan=plan, **kw)
        order.append(("end", label))

    monkeypatch.setattr(chat_panel, "stream_reply", recording)
    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#grid").toggle(2)  # a second model to compare: the grid's plan
        await pilot.press("5")
        await on_pane(pilot, "chat")
        chat = app.query_one("#chatpanel")
        from textual.widgets import Select

        # B starts on another model than A: here the grid's plan (the latest stage's when there is one)
        assert chat.query_one("#chat-a", Select).value == "base"
        assert chat.query_one("#chat-b", Select).value == "plan"
        chat.send("hello")  # A alone first
        await wait_for(pilot, lambda: len(chat.query("#transcript-a .msg.stats")) == 1, timeout=120)
        chat.select(ab=True)  # A/B turned on mid-chat: B answers the same conversation
        await pilot.pause()
        assert "same conversation as A (1 earlier prompt" in str(chat.query("#transcript-b .msg.note").first().render())
        chat.send("again")
        await wait_for(
            pilot,
            lambda: (
                len(chat.query("#transcript-b .msg.stats")) == 1 and len(chat.query("#transcript-a .msg.stats")) == 2
            ),
            timeout=120,
        )
        (_, first), (a_label, a_msgs), (b_label, b_msgs) = calls
        assert (a_label, b_label) == ("base", "plan")
        assert a_msgs == b_msgs, "both sides answer the same history"
        assert [m["role"] for m in b_msgs] == ["user", "assistant", "user"] and b_msgs[0]["content"] == "hello"
        assert order[-4:] == [("start", "base"), ("end", "base"), ("start", "plan"), ("end", "plan")]
        assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]

        # a stopped reply says so: stop while B waits for A (or streams)
        gate = threading.Event()

        def slow(model, tokenizer, messages, *, plan=None, cancelled=lambda: False, **kw):
            yield "x"
            while not cancelled():
                gate.wait(0.01)

        monkeypatch.setattr(chat_panel, "stream_reply", slow)
        chat.send("third")
        await wait_for(pilot, lambda: "x" in str(chat.query("#transcript-a .assistant").last().render()))
        chat.query_one("#transcript-a").focus()
        await pilot.press("escape")
        await wait_for(
            pilot,
            lambda: (
                len(chat.query("#transcript-a .msg.stats")) == 3 and len(chat.query("#transcript-b .msg.stats")) == 2
            ),
            timeout=30,
        )
        assert str(chat.query("#transcript-a .msg.stats").last().render()).startswith("stopped: ")
        assert str(chat.query("#transcript-b .msg.stats").last().render()).startswith("stopped: ")
        assert "stopped before it started" in str(chat.query("#transcript-b .assistant").last().render())


def test_session_that_cannot_be_read_exits_2_with_one_line(tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    assert main(["--session", str(tmp_path / "missing.json")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "no such session file" in out.err
