"""The sessions pane: runs found on disk; open one, compare several, replay one.

It only lists and asks; the app does the opening (messages up).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, SelectionList, Static


def read_session(path: str | Path):
    """A session from a file (or a run folder), through `sessions.load_session` when it exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "session.json"
    try:
        from sessions import load_session  # lands with the sessions work
    except ImportError:
        load_session = None
    if load_session is not None:
        return load_session(p)
    from sessions.record import Session

    if not p.is_file():
        raise ValueError(f"no session file at {p}")
    try:
        s = Session.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"{p} is not a frankenlab session: {exc}") from None
    s.path = str(p)
    return s


def find_sessions(root: Path) -> list[tuple[Path, dict]]:
    """(path, summary dict) for every session file under root, newest first; broken ones say why."""
    try:
        from sessions import list_sessions
    except ImportError:
        list_sessions = None
    if list_sessions is not None:
        out = []
        for entry in list_sessions([root]):
            s = entry.session
            if s is None:
                out.append((entry.path, {"recipe": {"name": "(unreadable)"}, "status": entry.error or "error",
                                         "stages": [], "created": 0}))
            else:
                out.append((entry.path, {"recipe": s.recipe, "status": s.status, "stages": s.stages,
                                         "created": s.created}))
        return out
    out = []
    for p in sorted(Path(root).glob("*/session.json"), key=lambda q: q.stat().st_mtime, reverse=True):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append((p, d))
    return out


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
        found = find_sessions(self.runs_dir)
        for p, d in found:
            name = (d.get("recipe") or {}).get("name", "?")
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.get("created") or 0))
            stages = len(d.get("stages", []))
            sl.add_option((f"{name:<18} {d.get('status', '?'):<9} {stages} stages  {when}  {p.parent.name}", str(p)))
        self.query_one("#sessions-where", Static).update(
            f"{len(found)} session(s) under {self.runs_dir}/ (space selects; select several to compare)")

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
