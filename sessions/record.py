"""The session record: what was asked, what happened, what was measured. JSON, versioned.

Saved atomically (write a temporary file, fsync, rename) after every stage so that a crash, a
kill or a cancel leaves a valid file holding everything measured so far.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class StageRecord:
    index: int  # 0 = baseline (the model as loaded), 1.. = recipe stages
    kind: str
    name: str = ""
    params: dict = field(default_factory=dict)
    status: str = "pending"  # pending | running | done | failed | cancelled | skipped
    metrics: list[dict] = field(default_factory=list)  # {"name", "value", "protocol", ...}
    params_count: int | None = None
    params_nonzero: int | None = None
    num_layers: int | None = None
    footprint: dict | None = None
    seconds: float | None = None
    artifact: str | None = None
    report: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    error: str | None = None

    def metric(self, name: str) -> dict | None:
        return next((m for m in self.metrics if m["name"] == name), None)


@dataclass
class Session:
    recipe: dict
    model_source: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    status: str = "running"  # running | done | failed | cancelled
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION
    path: str | None = None  # where it was last saved (not serialized)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Session":
        d = dict(d)
        stages = [StageRecord(**s) for s in d.pop("stages", [])]
        return cls(stages=stages, **d)

    def save(self, path: str | Path) -> Path:
        self.updated = time.time()
        p = Path(path)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2, default=_json_default))
        self.path = str(p)
        return p


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
