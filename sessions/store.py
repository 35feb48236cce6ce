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
from dataclasses import dataclass
from pathlib import Path

from frankenlab.pipeline.atomic import guarded_path
from frankenlab.pipeline.runlock import safe_slug
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
    """One file-name piece: no separators, no '..', no leading dot (`pipeline.runlock.safe_slug`)."""
    return safe_slug(text, "session")


def save_copy(session: Session, path: str | Path) -> Path:
    """Save `session` to `path` (atomically) so that the copy still finds the run's stage models:
    artifact paths are made absolute first. Returns the path written."""
    if session.path:
        here = Path(session.path).resolve().parent
        for st in session.stages:
            if st.artifact and not Path(st.artifact).is_absolute():
                found = session.artifact_path(st.index)
                st.artifact = str(found.resolve()) if found else str((here / st.artifact).resolve())
    return session.save(path)


def user_copy_path(session: Session, folder: str | Path | None = None) -> Path:
    """<user sessions dir>/<name>-<id>.json, or <name>-<id>-2.json ... when that is taken: a new name."""
    target = Path(folder) if folder else user_sessions_dir()
    # the id and the name come from a file: slugged, and the guard keeps the copy inside `target`
    stem, n = f"{_slug(session.title)}-{_slug(session.id)}", 1
    path = guarded_path(target, f"{stem}.json")
    while path.exists() and (session.path is None or path.resolve() != Path(session.path).resolve()):
        n += 1
        path = guarded_path(target, f"{stem}-{n}.json")
    return path


def save_to_user_dir(session: Session, name: str | None = None, folder: str | Path | None = None) -> Path:
    """Save a copy of `session` as <user sessions dir>/<name>-<id>.json (atomically); returns the path.

    Artifact paths are made absolute first so the copy still finds the run's stage models.
    """
    if name:
        session.name = name
    target = Path(folder) if folder else user_sessions_dir()
    return save_copy(session, guarded_path(target, f"{_slug(session.title)}-{_slug(session.id)}.json"))


# -- sessions opened or saved anywhere: remembered, so the lab's list keeps showing them ------------
RECENT_FILE = "recent-sessions.json"
RECENT_MAX = 50


def recent_sessions_file() -> Path:
    """`$XDG_DATA_HOME/frankenlab/recent-sessions.json` (default ~/.local/share/frankenlab/)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "frankenlab" / RECENT_FILE


def recent_sessions() -> list[Path]:
    """Session files opened or saved lately, newest first (only those that still exist); an
    unreadable list is an empty one."""
    import json

    try:
        raw = json.loads(recent_sessions_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = raw.get("sessions") if isinstance(raw, dict) else None
    if not isinstance(paths, list):
        return []
    return [Path(p) for p in paths if isinstance(p, str) and Path(p).is_file()]


def remember_session(path: str | Path) -> None:
    """Put `path` first in the recent sessions list (written atomically); never raises."""
    import json

    from frankenlab.pipeline.atomic import atomic_write_text

    p = str(Path(path).expanduser().resolve())
    paths = [p] + [str(q) for q in recent_sessions() if str(q) != p]
    try:
        atomic_write_text(recent_sessions_file(), json.dumps({"sessions": paths[:RECENT_MAX]}, indent=1) + "\n")
    except OSError:
        pass


RUN_FILES = (SESSION_FILE, "recipe.toml", "run.log")  # what a run writes in its folder, beside stages/


def claim_run_folder(out: str | Path, *, force: bool = False) -> str | None:
    """Make sure a new run may write into `out`; never overwrite a session without a word.

    A folder holding a session that is not live (done, failed, cancelled, interrupted, or a file
    that cannot be read) is refused with `RunFolderBusy`, whose one line names the ways on: resume
    with `frankenlab replay OUT --from-stage K` (K after the last finished stage that can be
    resumed from), `--force`, or another folder. With `force` the old session, recipe, log and stage
    folders are moved aside to `OUT/previous-<time>/` (never deleted) and the message says where.
    A live run's folder is left to the run lock (`pipeline.runlock`), which refuses it. A run file
    that is a symbolic link is refused (`pipeline.atomic.UnsafeOutputPath`) either way."""
    import shlex
    import time

    from frankenlab.pipeline.atomic import refuse_link
    from frankenlab.pipeline.runlock import RunFolderBusy

    out = Path(out)
    for name in RUN_FILES:
        refuse_link(out / name)
    f = out / SESSION_FILE
    if not f.exists():
        return None
    try:
        old = load_session(f)
    except SessionError as exc:
        old, what = None, f"a session file that cannot be read ({exc})"
    if old is not None:
        if old.status == "running":  # alive (or on another machine): the run lock decides
            return None
        what = f"a {old.status} session ({old.title}, {old.id})"
    if not force:
        where = shlex.quote(str(out))
        if old is not None and old.status == "done":
            way = f"re-run it and compare with `frankenlab replay {where}`"
        else:
            k = resume_point(old) if old is not None else 1
            way = f"resume after its last finished stage with `frankenlab replay {where} --from-stage {k}`"
        raise RunFolderBusy(
            f"{out} already holds {what}: {way}, start over with --force (the old session moves to "
            f"{out}/previous-<time>/, nothing is deleted), or choose another folder (--out DIR)"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out / f"previous-{stamp}", 1
    while aside.exists():
        n += 1
        aside = out / f"previous-{stamp}-{n}"
    aside.mkdir()
    for name in (*RUN_FILES, "stages"):
        if (out / name).exists():
            os.replace(out / name, aside / name)
    return f"the previous session in {out} was moved to {aside}"


def resume_point(session: Session) -> int:
    """The stage `frankenlab replay --from-stage K` resumes `session` at: after its last finished
    stage when the model saved there can be loaded, else the latest earlier one that can (1: from
    the start)."""
    from frankenlab.sessions.replay import resume_problem

    n = len((session.recipe or {}).get("stages") or [])
    done = [st.index for st in session.stages if st.status == "done"]
    last = max(done, default=0)
    for k in range(min(last + 1, max(n, 1)), 1, -1):
        try:
            if resume_problem(session, k) is None:
                return k
        except (OSError, ValueError, KeyError):
            continue
    return 1
