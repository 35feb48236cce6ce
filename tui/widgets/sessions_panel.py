"""The sessions pane: runs found on disk; open one, compare several, replay one.

It only lists (through `sessions.list_sessions`, which validates every file and names the broken
ones) and asks; the app does the opening with `sessions.load_session` (messages up).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, SelectionList, Static

from frankenlab.sessions import list_sessions


class SessionsPanel(Vertical):
    class Requested(Message):
        def __init__(self, action: str, paths: list[Path]):
            super().__init__()
            self.action, self.paths = action, paths

    def __init__(self, runs_dir: Path, *, id: str | None = None):
        super().__init__(id=id)
        self.runs_dir = Path(runs_dir)

    def compose(self) -> ComposeResult:
        yield Static("", id="sessions-where", classes="hint")
        yield SelectionList(id="sessions-list")
        with Horizontal(id="sessions-buttons"):
            yield Button("Open", id="sess-open", variant="primary")
            yield Button("Compare", id="sess-compare")
            yield Button("Replay", id="sess-replay")
            yield Button("Refresh", id="sess-refresh")

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self) -> None:
        sl = self.query_one(SelectionList)
        sl.clear_options()
        found = list_sessions([self.runs_dir])
        for entry in found:
            s = entry.session
            if s is None:
                label = f"{'(unreadable)':<18} {entry.error or 'error'}"
            else:
                name = (s.recipe or {}).get("name", "?")
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created or 0))
                label = f"{name:<18} {s.status:<9} {len(s.stages)} stages  {when}  {entry.path.parent.name}"
            sl.add_option((Text(label), str(entry.path)))  # an error message is not markup
        self.query_one("#sessions-where", Static).update(
            f"{len(found)} session(s) under {self.runs_dir}/ (space selects; select several to compare)"
        )

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
