"""A sweep's events and its progress lines: what `run_sweep` (`sessions.sweep.run`) tells a listener.

Events like the runner's, derived from `pipeline.events.Event` (a `time`, and `to_dict`): the sweep
starts, each node starts, makes progress and finishes, each configuration's session is written, the
sweep finishes. `SweepLog` writes the node lines, and the nodes' progress (throttled by `Throttle`),
to the sweep's sweep.log; the CLI and the lab's Sweep pane throttle their progress lines the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from frankenlab.pipeline import events as ev

LOG_PROGRESS_EVERY_S = 30.0  # a running node's progress line in sweep.log, at most this often (and each new stage)


class Throttle:
    """Which progress lines to show: a node's first, a new stage's first (the message's words before
    its first digit or colon change), its last (fraction 1), and otherwise one per `every` seconds."""

    def __init__(self, every: float):
        self.every = every
        self.seen: dict[str, tuple[float, str]] = {}

    @staticmethod
    def _phase(message: str) -> str:
        import re

        return re.split(r"[\d:]", message, maxsplit=1)[0].strip()

    def due(self, key: str, message: str, fraction: float) -> bool:
        now, phase = time.monotonic(), self._phase(message)
        last = self.seen.get(key)
        if last is not None and last[1] == phase and now - last[0] < self.every and fraction < 1.0:
            return False
        self.seen[key] = (now, phase)
        return True


def progress_text(e: NodeProgress) -> str:
    return f"{e.message or 'running'} ({e.fraction:.0%})"


class SweepLog:
    """A listener that writes the sweep's node lines, and its nodes' progress (throttled), to sweep.log."""

    def __init__(self, path: Path, labels: dict[str, str], every: float = LOG_PROGRESS_EVERY_S):
        self.path, self.labels, self.throttle = path, labels, Throttle(every)

    def __call__(self, e) -> None:
        if isinstance(e, NodeStarted):
            line = f"start    {e.key}  {e.label}"
        elif isinstance(e, NodeProgress):
            if not self.throttle.due(e.key, e.message, e.fraction):
                return
            line = f"progress {e.key}  {self.labels.get(e.key, '')}: {progress_text(e)}"
        elif isinstance(e, NodeFinished):
            secs = f" ({e.seconds:.1f}s)" if e.seconds else ""
            line = f"{e.status:<8} {e.key}  {e.label}{secs}{': ' + e.message if e.message else ''}"
        else:
            return
        from frankenlab.pipeline.atomic import open_append

        try:
            with open_append(self.path) as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        except OSError:
            pass  # the log is a courtesy: the sweep goes on


@dataclass(frozen=True)
class SweepStarted(ev.Event):
    name: str
    configs: list  # [{"index", "label", "slug"}]
    nodes: int
    todo: int  # nodes to compute in this run
    executor: str
    message: str = ""  # e.g. the lock of a sweep that is gone was taken over


@dataclass(frozen=True)
class NodeStarted(ev.Event):
    key: str
    label: str


@dataclass(frozen=True)
class NodeProgress(ev.Event):
    key: str
    fraction: float
    message: str = ""


@dataclass(frozen=True)
class NodeFinished(ev.Event):
    key: str
    label: str
    status: str  # done | failed | cancelled | blocked
    seconds: float | None = None
    message: str = ""


@dataclass(frozen=True)
class ConfigFinished(ev.Event):
    index: int
    label: str
    status: str
    session: str  # path of its session.json


@dataclass(frozen=True)
class SweepFinished(ev.Event):
    status: str
    record: str
