"""Where sessions live and how they are found.

Two places, both predictable:
- next to the run: `frankenlab run` (and the lab's runs) write `<run folder>/session.json`, by
  default under `./runs/<recipe>-<time>/`, beside the stage models the session points to;
- the user's session folder, for sessions saved or imported by hand:
  `$FRANKENLAB_SESSIONS`, else `$XDG_DATA_HOME/frankenlab/sessions`, else
  `~/.local/share/frankenlab/sessions`, holding `<name>-<id>.json` files.
`frankenlab sessions` and `frankenlab compare` with no arguments look in both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from frankenlab.sessions.session import SESSION_FILE, Session, SessionError, load_session

SESSIONS_ENV = "FRANKENLAB_SESSIONS"
RUNS_DIR = Path("runs")
_MARKER = b'"frankenlab-session"'


def user_sessions_dir() -> Path:
    env = os.environ.get(SESSIONS_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "frankenlab" / "sessions"


def default_session_dirs() -> list[Path]:
    """./runs (relative to the current folder) and the user's session folder."""
    return [RUNS_DIR, user_sessions_dir()]


def _looks_like_session(path: Path) -> bool:
    if path.name == SESSION_FILE:
        return True
    try:
        with open(path, "rb") as f:
            return _MARKER in f.read(4096)
    except OSError:
        return False


def find_session_files(paths: list[str | Path] | None = None, max_depth: int = 3) -> list[Path]:
    """Session files named by `paths`: files as given, folders searched (session.json up to
    `max_depth` levels down, plus session-looking *.json files directly inside)."""
    found: list[Path] = []
    for root in default_session_dirs() if paths is None else [Path(p).expanduser() for p in paths]:
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            continue
        for f in sorted(root.glob("*.json")):
            if f.is_file() and _looks_like_session(f):
                found.append(f)
        base_depth = len(root.parts)
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).parts) - base_depth
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
            if depth > 0 and SESSION_FILE in filenames:
                found.append(Path(dirpath) / SESSION_FILE)
    seen, unique = set(), []
    for f in found:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


@dataclass
class SessionEntry:
    """One file found by `list_sessions`: the session, or why it could not be read."""

    path: Path
    session: Session | None = None
    error: str | None = None

    @property
    def sort_time(self) -> float:
        if self.session is not None:
            return self.session.created
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


def list_sessions(dirs: list[str | Path] | None = None, *, include_broken: bool = True) -> list[SessionEntry]:
    """Every session under `dirs` (default: ./runs and the user's session folder), newest first.

    Files that cannot be loaded are returned with their error message (never raised), so a list
    can show them beside the good ones.
    """
    entries = []
    for f in find_session_files(dirs):
        try:
            entries.append(SessionEntry(f, load_session(f)))
        except SessionError as exc:
            if include_broken:
                entries.append(SessionEntry(f, None, str(exc)))
    entries.sort(key=lambda e: e.sort_time, reverse=True)
    return entries


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "session"


def save_to_user_dir(session: Session, name: str | None = None, folder: str | Path | None = None) -> Path:
    """Save a copy of `session` as <user sessions dir>/<name>-<id>.json (atomically); returns the path.

    Artifact paths are made absolute first so the copy still finds the run's stage models.
    """
    if name:
        session.name = name
    if session.path:
        here = Path(session.path).resolve().parent
        for st in session.stages:
            if st.artifact and not Path(st.artifact).is_absolute():
                idx = st.index
                found = session.artifact_path(idx)
                st.artifact = str(found.resolve()) if found else str((here / st.artifact).resolve())
    target = Path(folder) if folder else user_sessions_dir()
    return session.save(target / f"{_slug(session.title)}-{session.id}.json")
