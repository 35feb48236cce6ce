"""What the runner tells its one listener (the TUI, the CLI's progress bars, a test).

Events are small frozen dataclasses; `stage` is the index in the run (-1 = loading, 0 = the
baseline evaluation, 1.. = the recipe's stages). `to_dict` gives the session's event log entry.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Event:
    stage: int
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["event"] = type(self).__name__
        return d


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


@dataclass(frozen=True)
class RunFailed(Event):
    message: str
    error_type: str = ""


@dataclass(frozen=True)
class RunFinished(Event):
    status: str  # "done" | "failed" | "cancelled"
    session_path: str = ""


Listener = Callable[[Event], Any]


def ignore(_: Event) -> None:
    return None
