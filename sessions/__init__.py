"""What happened: session records, their files, replays and comparison tables.

The API the lab and the CLI use (none of it imports Textual; only `replay` imports torch, lazily):
- `load_session(path) -> Session`, raising `SessionError` with a message for the user;
  `Session.save(path)` writes atomically. `Session.stages` are `StageRecord`s, the class the
  runner builds and sends in `StageFinished` (defined once, in `pipeline.records`).
- `list_sessions(dirs=None) -> [SessionEntry]` (path, session or error), newest first;
  `user_sessions_dir()`, `default_session_dirs()`, `save_to_user_dir(session, name)`.
- `compare_table(sessions) -> CompareTable` / `compare_rows(sessions) -> [dict]`,
  `format_table(table, "md" | "csv" | "json")`.
- `replay(session, out_dir, from_stage=..., tolerance=..., on_diff=...) -> ReplayResult`.
- `SessionRecorder(path)`: a runner listener that builds and saves the session from events;
  `record_run(recipe, out_dir, ...) -> Session` runs a recipe with one attached.
"""

from frankenlab.pipeline.records import StageRecord
from frankenlab.sessions.compare import (
    CompareTable,
    compare_rows,
    compare_table,
    describe_stage,
    format_table,
    headline,
)
from frankenlab.sessions.recorder import SessionRecorder, record_run
from frankenlab.sessions.replay import DEFAULT_TOLERANCE, MetricDiff, ReplayResult, compare_sessions, replay
from frankenlab.sessions.session import SCHEMA_VERSION, Session, SessionError, load_session
from frankenlab.sessions.store import (
    SessionEntry,
    default_session_dirs,
    list_sessions,
    save_to_user_dir,
    user_sessions_dir,
)

__all__ = [
    "SCHEMA_VERSION",
    "Session",
    "SessionRecorder",
    "record_run",
    "StageRecord",
    "SessionError",
    "load_session",
    "SessionEntry",
    "list_sessions",
    "default_session_dirs",
    "user_sessions_dir",
    "save_to_user_dir",
    "CompareTable",
    "compare_table",
    "compare_rows",
    "format_table",
    "describe_stage",
    "headline",
    "DEFAULT_TOLERANCE",
    "MetricDiff",
    "ReplayResult",
    "compare_sessions",
    "replay",
]
