"""What the runner tells its listeners (the session recorder, the TUI, the CLI's progress bars, a test).

Events are small frozen dataclasses; `stage` is the index in the run (-1 = loading, 0 = the
baseline evaluation, 1.. = the recipe's stages). `to_dict` gives the session's event log entry.
The events carry everything a listener needs to know (`sessions.recorder` builds the whole
session from them), so nobody has to read a file the run wrote to learn what happened:
RunStarted (the recipe and the stages it will run), ModelReady (source, environment),
StageStarted, Progress, MetricMeasured, LogLine, StageFinished (the whole stage record),
RunFailed, RunFinished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    stage: int
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["event"] = type(self).__name__
        return d


@dataclass(frozen=True)
class RunStarted(Event):
    recipe: dict  # Recipe.to_dict()
    out_dir: str
    stages: list  # [{"index", "kind", "name", "params"}], the baseline (index 0) first
    start_stage: int = 1  # stages before it are not run (replay --from-stage)


@dataclass(frozen=True)
class ModelReady(Event):
    model_source: dict  # {"ref", "kind", "path", "name", ...}
    environment: dict  # versions, device, dtype, threads, seed


@dataclass(frozen=True)
class StageStarted(Event):
    kind: str
    params: dict


@dataclass(frozen=True)
class Progress(Event):
    fraction: float  # 0..1 within the stage
    message: str = ""


@dataclass(frozen=True)
class MetricMeasured(Event):
    name: str  # e.g. "perplexity", "triviaqa_closed", "lora_loss"
    value: float
    protocol: str = ""  # e.g. "wikitext2-concat-512"; printed next to every number
    step: int | None = None  # for curves (LoRA loss)


@dataclass(frozen=True)
class LogLine(Event):
    message: str
    level: str = "info"


@dataclass(frozen=True)
class StageFinished(Event):
    kind: str
    status: str  # "done" | "failed" | "cancelled"
    seconds: float
    summary: dict  # params, density, headline metrics
    # the whole stage record: index, kind, name, params, status, metrics, params_count, params_nonzero,
    # num_layers, footprint, seconds, artifact, report, details (sessions.StageRecord.from_dict reads it)
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunFailed(Event):
    message: str
    error_type: str = ""
    cause: str = ""  # "input": the user can fix it (recipe, data, model path, disk); "": a crash


@dataclass(frozen=True)
class RunFinished(Event):
    status: str  # "done" | "failed" | "cancelled"
    out_dir: str = ""


Listener = Callable[[Event], Any]


def ignore(_: Event) -> None:
    return None
