"""The sessions pane: runs found on disk; open one, compare several, replay one.

It only lists (through `sessions.list_sessions`, which validates every file and names the broken
ones) and asks; the app does the opening with `sessions.load_session` (messages up).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, SelectionList, Static

from frankenlab.sessions import headline, list_sessions
from frankenlab.sessions.printable import printable
from frankenlab.sessions.store import recent_sessions

HEADER = f"{'name':<12} {'status':<9} {'stages':<6} perplexity (protocol), created, folder"


def session_label(entry) -> Text:
    """One line under HEADER: name, status, stages done of those recorded (`1/2`, as `frankenlab
    sessions` counts them), the last perplexity with its protocol (whole at 80 columns), when, and
    the folder; the full path shows under the list for the highlighted session. No control
    character from a file reaches the screen."""
    s = entry.session
    if s is None:
        return Text(printable(f"{'(unreadable)':<12} {entry.error or 'error'}"), style="red")
    h = headline(s)
    name = printable((s.recipe or {}).get("name", "?"))[:12]
    stages = f"{h['stages_done']}/{h['stages']}"
    text = Text(printable(f"{name:<12} {s.status:<9} {stages:<6} "))
    ppl = "-" if h["perplexity"] is None else f"{h['perplexity']:.2f} ({printable(h['protocol'] or '?')})"
    text.append(ppl, style="bold")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created or 0))
    text.append(printable(f"  {when}  {entry.path.parent.name}"), style="dim")
    return text


def session_detail(entry) -> str:
    """The line under the list for the highlighted session: where it lives, in full."""
    s = entry.session
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created or 0)) if s is not None else "?"
    return printable(f"{entry.path}  (created {when})")


class SessionsPanel(Vertical):
    class Requested(Message):
        def __init__(self, action: str, paths: list[Path]):
            super().__init__()
            self.action, self.paths = action, paths

    def __init__(self, runs_dir: Path, *, id: str | None = None):
        super().__init__(id=id)
        self.runs_dir = Path(runs_dir)
        self.entries: dict = {}  # path -> SessionEntry, as listed

    def compose(self) -> ComposeResult:
        yield Static("", id="sessions-where", classes="hint")
        yield Static(" " * 6 + HEADER, id="sessions-header", classes="hint")  # over the list's check boxes
        yield SelectionList(id="sessions-list")
        yield Static("", id="sessions-detail", classes="hint")
        with Horizontal(id="sessions-buttons"):
            yield Button("Open", id="sess-open", variant="primary")
            yield Button("Compare", id="sess-compare")
            yield Button("Replay", id="sess-replay")
            yield Button("Refresh", id="sess-refresh")

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self) -> None:
        """The sessions under the runs folder, and those opened or saved elsewhere lately
        (`sessions.store.recent_sessions`), newest first, each once."""
        sl = self.query_one(SelectionList)
        sl.clear_options()
        found = list_sessions([self.runs_dir])
        here = {os.path.realpath(e.path) for e in found}
        elsewhere = [p for p in recent_sessions() if os.path.realpath(p) not in here]
        if elsewhere:
            found = sorted(found + list_sessions(elsewhere), key=lambda e: e.sort_time, reverse=True)
        self.entries = {str(e.path): e for e in found}
        for entry in found:
            sl.add_option((session_label(entry), str(entry.path)))  # an error message is not markup
        others = f" and {len(elsewhere)} opened or saved elsewhere" if elsewhere else ""
        self.query_one("#sessions-where", Static).update(
            f"{len(found)} session(s): under {self.runs_dir}/{others} (space selects; select several to compare)"
        )

    @on(SelectionList.SelectionHighlighted, "#sessions-list")
    def _highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        entry = self.entries.get(str(event.selection.value))
        self.query_one("#sessions-detail", Static).update(Text(session_detail(entry)) if entry else "")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        action = (event.button.id or "").removeprefix("sess-")
        if action == "refresh":
            self.refresh_list()
            return
        sl = self.query_one(SelectionList)
        paths = [Path(v) for v in sl.selected]
        if not paths and sl.highlighted is not None:
            paths = [Path(sl.get_option_at_index(sl.highlighted).value)]
        if not paths:
            self.app.notify("select a session first (space)", severity="warning")
            return
        self.post_message(self.Requested(action, paths))
