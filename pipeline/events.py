"""What the runner and the sweep scheduler tell their listeners (the session recorder, the TUI, the CLI).

Every event is a small frozen dataclass derived from `Event`, which stamps its `time` and gives
its JSON form (`to_dict`: its fields plus `"event"`, the class name). A run's events
(`RunEvent`) also carry `stage`, the index in the run (-1 = loading, 0 = the baseline evaluation,
1.. = the recipe's stages). They carry everything a listener needs to know (`sessions.recorder`
builds the whole session from them), so nobody has to read a file the run wrote to learn what
happened: RunStarted (the recipe and the stages it will run), ModelReady (source, environment),
StageStarted, Progress, MetricMeasured, LogLine, StageFinished (the stage record, nothing else),
RunFailed, RunCancelled, RunFinished. A sweep's events (`sessions.sweep.events`: SweepStarted,
NodeStarted, ...) derive from `Event` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from frankenlab.pipeline.records import StageRecord


@dataclass(frozen=True)
class Event:
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict:
        """{"event": class name, field: value, ...} in JSON types; a record field in its own JSON form."""
        d = asdict(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                d[f.name] = value.to_dict()
        return {"event": type(self).__name__, **d}


@dataclass(frozen=True)
class RunEvent(Event):
    """An event of one run: `stage` is the index it belongs to (-1 = loading, 0 = baseline, 1.. = stages)."""

    stage: int


@dataclass(frozen=True)
class RunStarted(RunEvent):
    recipe: dict  # Recipe.to_dict()
    out_dir: str
    stages: list  # [{"index", "kind", "name", "params"}], the baseline (index 0) first
    start_stage: int = 1  # stages before it are not run (replay --from-stage)


@dataclass(frozen=True)
class ModelReady(RunEvent):
    model_source: dict  # {"ref", "kind", "path", "name", ...}
    environment: dict  # versions, device, dtype, threads, seed


@dataclass(frozen=True)
class StageStarted(RunEvent):
    kind: str
    params: dict


@dataclass(frozen=True)
class Progress(RunEvent):
    fraction: float  # 0..1 within the stage
    message: str = ""


@dataclass(frozen=True)
class MetricMeasured(RunEvent):
    name: str  # e.g. "perplexity", "triviaqa_closed", "lora_loss"
    value: float
    protocol: str = ""  # e.g. "wikitext2-concat-512"; printed next to every number
    step: int | None = None  # for curves (LoRA loss)


@dataclass(frozen=True)
class LogLine(RunEvent):
    message: str
    level: str = "info"


@dataclass(frozen=True)
class StageFinished(RunEvent):
    """A stage is over: `StageFinished(record)`; its stage is `record.index`."""

    stage: int = field(init=False)
    record: StageRecord

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", self.record.index)

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def seconds(self) -> float | None:
        return self.record.seconds


@dataclass(frozen=True)
class RunFailed(RunEvent):
    """The run stopped on an error; `stage` is the stage it belongs to (a refused stage owns its refusal)."""

    message: str
    cause: str = ""  # "input": the user can fix it (recipe, data, model path, disk); "": a crash


@dataclass(frozen=True)
class RunCancelled(RunEvent):
    """The user cancelled the run (or pressed Ctrl-C); finished stages are kept."""

    message: str


@dataclass(frozen=True)
class RunFinished(RunEvent):
    status: str  # "done" | "failed" | "cancelled"
    out_dir: str = ""


Listener = Callable[[Event], Any]


def ignore(_: Event) -> None:
    return None
