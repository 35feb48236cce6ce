"""The session record: what was asked, what happened, what was measured. JSON, versioned.

Saved atomically (write a temporary file, fsync, rename, fsync the folder) after every stage, so
a crash, a kill -9 or a cancel leaves either the previous complete file or the new complete file,
never half of one. Loading reads plain JSON only (no pickle, no object hooks, nothing executed),
checks it against `sessions.schema.SESSION_SCHEMA` and turns every problem into a `SessionError`
whose message a user can act on. The format is documented in sessions/SCHEMA.md.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from frankenlab.pipeline.atomic import atomic_write_text
from frankenlab.pipeline.records import StageRecord  # the stage record, built by the runner
from frankenlab.sessions.schema import FORMAT, SCHEMA_VERSION, SESSION_SCHEMA, validate

STATUSES = ("running", "done", "failed", "cancelled", "interrupted")
# "interrupted" is never written: it is how a reader sees a "running" session whose owner is gone
SESSION_FILE = "session.json"


class SessionError(ValueError):
    """A session file that cannot be used; the message says which file, what is wrong and what to do."""


def _writer() -> dict:
    try:
        from importlib.metadata import version

        v = version("frankenlab")
    except Exception:  # noqa: BLE001 - running from a source tree without an install
        v = "unknown"
    return {"program": "frankenlab", "version": v}


@dataclass
class Session:
    recipe: dict
    model_source: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    status: str = "running"  # running | done | failed | cancelled
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    name: str = ""  # a user's label; empty = the recipe's name
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION
    writer: dict = field(default_factory=_writer)
    replay_of: dict | None = None  # {"session_id", "path", "from_stage"} when this run replays another
    owner: dict | None = None  # {"pid", "host", "started"}: the process running it (pipeline.runlock)
    extra: dict = field(default_factory=dict)  # unknown keys from a file, written back unchanged
    path: str | None = None  # where it was last saved or loaded from (not serialized)
    save_error: str | None = None  # why the last save failed, if it did (not serialized)

    # -- convenience ---------------------------------------------------------------------------
    @property
    def title(self) -> str:
        return self.name or str(self.recipe.get("name") or "untitled")

    def final_stage(self) -> StageRecord | None:
        """The last stage that finished: the model the session ends with."""
        done = [s for s in self.stages if s.status == "done"]
        return done[-1] if done else None

    def stage(self, index: int) -> StageRecord:
        found = next((s for s in self.stages if s.index == index), None)
        if found is None:
            raise KeyError(f"session {self.id} has no stage {index}")
        return found

    def artifact_path(self, index: int) -> Path | None:
        """The saved model folder of stage `index`, found even when the run folder has moved."""
        st = self.stage(index)
        if not st.artifact:
            return None
        p = Path(st.artifact).expanduser()
        candidates = [p] if p.is_absolute() else [Path.cwd() / p]
        if self.path:
            here = Path(self.path).parent
            if not p.is_absolute():
                candidates.append(here / p)
            candidates.append(here / "stages" / p.name)
            if p.is_absolute():  # a moved folder: the old path's tail under the run folder or its parents
                tails = [Path(*p.parts[-k:]) for k in range(2, min(len(p.parts) - 1, 4) + 1)]
                candidates += [base / tail for base in (here, *list(here.parents)[:2]) for tail in tails]
        # a model folder, or an eora stage folder whose manifest names its quantized model and adapter
        return next(
            (c for c in candidates if (c / "config.json").exists() or (c / "frankenlab-quant.json").exists()), None
        )

    # -- (de)serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT}
        d.update(self.extra)
        for f in fields(self):
            if f.name in ("path", "save_error", "extra", "stages"):
                continue
            d[f.name] = _plain(getattr(self, f.name))
        d["stages"] = [_plain(s.to_dict()) for s in self.stages]
        if d.get("status") == "interrupted":  # derived when read; on disk it stays what the run wrote
            d["status"] = "running"
            for st in d["stages"]:
                st["status"] = "running" if st.get("status") == "interrupted" else st.get("status")
        return d

    def mark_interrupted(self) -> bool:
        """A session still "running" whose owning process is gone (kill -9, power cut) becomes
        "interrupted", and so does the stage it was in; True when that happened."""
        from frankenlab.pipeline.runlock import describe_owner, owner_alive

        if self.status != "running" or owner_alive(self.owner) is not False:
            return False
        self.status = "interrupted"
        why = f"the run's process ({describe_owner(self.owner)}) ended without finishing this stage"
        for st in self.stages:
            if st.status == "running":
                st.status, st.error = "interrupted", st.error or why
        return True

    @classmethod
    def from_dict(cls, d: dict) -> Session:
        """Build from a dict already validated (`load_session` does that) or trusted (from `to_dict`)."""
        d = dict(d)
        d.pop("format", None)
        d.setdefault("writer", {})  # a file without one was not written by this frankenlab
        stages = [StageRecord.from_dict(s) for s in d.pop("stages", [])]
        known = {f.name for f in fields(cls)} - {"extra", "path", "save_error", "stages"}
        return cls(
            stages=stages,
            **{k: v for k, v in d.items() if k in known},
            extra={k: v for k, v in d.items() if k not in known},
        )

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def save(self, path: str | Path) -> Path:
        """Write atomically to `path` (a file, or a folder that gets session.json)."""
        self.updated = time.time()
        p = Path(path)
        if p.is_dir():
            p = p / SESSION_FILE
        atomic_write_text(p, self.dumps())
        self.path = str(p)
        return p


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only (tuples -> lists, Paths -> str, tensors -> numbers)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return _plain(_json_default(value))


def _json_default(o: Any):
    """Last resort for values stages put in reports: never let one odd value lose a session."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# -- loading ---------------------------------------------------------------------------------------
def session_file(path: str | Path) -> Path:
    """`path` itself, or `path`/session.json when a run folder is given."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / SESSION_FILE
    return p


def _constant(name: str):
    return float(name)  # NaN / Infinity as Python writes them (e.g. a diverged perplexity)


def loads_session(text: str, where: str = "session") -> Session:
    """Parse and validate session JSON text; raises SessionError."""
    if not text.strip():
        raise SessionError(
            f"{where} is empty: the file was created but never written (a crash before the "
            "first save?). Delete it, or re-run the recipe."
        )
    try:
        data = json.loads(text, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" at").strip()  # "Invalid control character at" + " at line 3"
        at_end = exc.pos >= len(text.rstrip())
        if what.startswith("Invalid control character"):
            hint = f"it holds a control character (code {ord(text[exc.pos]):#04x}) there: the file is corrupted"
        elif (at_end or what.startswith("Unterminated string")) and _ends_early(text):
            hint = "it ends early: the file was truncated (copied while being written, or the disk filled up)"
        else:
            hint = "it is corrupted"
        raise SessionError(
            f"{where} is not valid JSON ({what} at line {exc.lineno}, column {exc.colno}): "
            f"{hint}. If the run folder holds a session.json.*.tmp file, that is an unfinished "
            "save and can be deleted."
        ) from None
    except RecursionError:
        raise SessionError(f"{where} is nested too deeply to be a frankenlab session") from None
    return session_from_data(data, where)


def _ends_early(text: str) -> bool:
    """True when brackets or a string are still open at the end: the tell-tale of a cut-off file."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return in_string or depth > 0


def session_from_data(data: Any, where: str = "session") -> Session:
    if not isinstance(data, dict):
        raise SessionError(
            f"{where} is JSON but not a frankenlab session (expected an object, got {type(data).__name__})"
        )
    fmt = data.get("format")
    if fmt is not None and fmt != FORMAT:
        raise SessionError(f"{where} is a {fmt!r} file, not a frankenlab session")
    if fmt is None and not {"schema_version", "recipe", "stages"} <= set(data):
        raise SessionError(f'{where} is JSON but not a frankenlab session (no "format": "{FORMAT}" field)')
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise SessionError(f"{where}: schema_version must be a whole number, got {version!r}")
    if version > SCHEMA_VERSION:
        raise SessionError(
            f"{where} was written by a newer frankenlab (session schema version {version}; this "
            f"frankenlab reads versions up to {SCHEMA_VERSION}). Upgrade frankenlab to open it."
        )
    if version < 1:
        raise SessionError(f"{where}: schema_version {version} does not exist (versions start at 1)")
    data = migrate(data)
    problems = validate(data, SESSION_SCHEMA)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SessionError(f"{where} does not match the session schema (version {version}): {shown}")
    return Session.from_dict(data)


def migrate(data: dict) -> dict:
    """Bring an older schema version up to SCHEMA_VERSION, so a replay reruns what really ran.

    Each stage kind migrates its own params (its `migrate(params, version)` hook, e.g. width's
    1 -> 2: `sequential` appeared with the default "projection", so a version-1 WANDA stage is
    pinned to the "layer" statistics it ran); kinds this frankenlab does not know stay as they are.
    The event log of versions 1 and 2 is rewritten by `migrate_event_log` (2 -> 3).
    """
    from frankenlab.pipeline.stages import known_kind

    version = data.get("schema_version", SCHEMA_VERSION)
    if version >= SCHEMA_VERSION:
        return data

    def moved(kind, params):
        stype = known_kind(kind) if isinstance(kind, str) else None
        return stype.migrate(params, version) if stype is not None and isinstance(params, dict) else params

    data = dict(data)
    recipe = data.get("recipe")
    if isinstance(recipe, dict) and isinstance(recipe.get("stages"), list):
        recipe = {
            **recipe,
            "stages": [
                {"kind": spec["kind"], **moved(spec["kind"], {k: v for k, v in spec.items() if k != "kind"})}
                if isinstance(spec, dict) and "kind" in spec
                else spec
                for spec in recipe["stages"]
            ],
        }
        data["recipe"] = recipe
    if isinstance(data.get("stages"), list):
        data["stages"] = [
            {**rec, "params": moved(rec.get("kind"), rec.get("params"))}
            if isinstance(rec, dict) and "params" in rec
            else rec
            for rec in data["stages"]
        ]
    if version < 3 and isinstance(data.get("events"), list):
        data["events"] = migrate_event_log(data["events"])
    data["schema_version"] = SCHEMA_VERSION
    return data


def migrate_event_log(events: list) -> list:
    """Session schema 2 -> 3: the event log as the runner's events now read (pipeline/events.py).

    - A cancelled run logged `RunFailed` with its status, "cancelled", in `error_type`: it becomes
      `RunCancelled` (`stage`, `time`, `message`).
    - `RunFailed` loses `error_type` (it only ever held "failed"); `message` and `cause` stay.
    - `StageFinished` loses `summary` (parameter counts and headline metrics, copied from the stage
      record, which the session holds in `stages`); `kind`, `status`, `seconds` stay.
    Other entries, and keys this version does not know, are kept as they are.
    """
    out = []
    for e in events:
        if isinstance(e, dict) and e.get("event") == "RunFailed" and e.get("error_type") == "cancelled":
            e = {"event": "RunCancelled", **{k: e[k] for k in ("stage", "time", "message") if k in e}}
        elif isinstance(e, dict) and e.get("event") == "RunFailed":
            e = {k: v for k, v in e.items() if k != "error_type"}
        elif isinstance(e, dict) and e.get("event") == "StageFinished":
            e = {k: v for k, v in e.items() if k != "summary"}
        out.append(e)
    return out


def load_session(path: str | Path) -> Session:
    """Load and validate a session (a session.json file or the run folder holding one).

    Raises SessionError with a user-facing message for every problem: missing, unreadable,
    empty, truncated, corrupted, not a session, from a newer frankenlab, or not matching the schema.
    """
    p = session_file(path)
    if not p.exists():
        hint = " (the folder holds no session.json)" if Path(path).expanduser().is_dir() else ""
        raise SessionError(f"{path}: no such session file{hint}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SessionError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SessionError(f"{p} is not a text file (not UTF-8): it is corrupted or not a session") from None
    session = loads_session(text, str(p))
    session.path = str(p)
    session.mark_interrupted()
    return session


def finite(value: Any) -> float | None:
    """A metric value as a finite float, or None (missing, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
