"""The stage record: what one stage of a run did and measured, as one typed object.

The runner builds it (status, metrics, parameter counts, footprint, artifact, report, evaluation
details) and hands it whole to its listeners in `StageFinished`; a session keeps a list of them
(`sessions.session.Session.stages`), and a sweep node keeps one (`node.json`). It lives here, below
sessions, because the runner makes it and layers import one way (evals <- pipeline <- sessions <- tui).
Its JSON form is the stage record of sessions/SCHEMA.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STAGE_STATUSES = ("pending", "running", "done", "failed", "cancelled", "skipped", "interrupted")
# "interrupted" is never written: it is how a reader sees a "running" stage whose run's process is gone


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
    artifact: str | None = None  # folder of the model saved after this stage
    report: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    error: str | None = None
    reused_from: str | None = None  # id of the session this record was copied from (replay --from-stage)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for the round trip

    def metric(self, name: str, protocol: str | None = None) -> dict | None:
        return next(
            (m for m in self.metrics if m["name"] == name and (protocol is None or m.get("protocol", "") == protocol)),
            None,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> StageRecord:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
