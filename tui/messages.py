"""Messages thread workers send to the app (past tense: something happened), and the logging
handler that turns Python logging from any thread into such messages."""

from __future__ import annotations

import logging
from pathlib import Path

from textual.message import Message

from frankenlab.pipeline import events as ev
from frankenlab.tui.noise import is_ours_logger


class ModelLoaded(Message):
    def __init__(self, loaded):
        super().__init__()
        self.loaded = loaded


class ModelLoadFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class RunEventArrived(Message):
    """One runner event, forwarded from the run worker's thread."""

    def __init__(self, event: ev.Event):
        super().__init__()
        self.event = event


class RunEnded(Message):
    def __init__(self, session, out_dir: Path, error: str | None = None):
        super().__init__()
        self.session, self.out_dir, self.error = session, out_dir, error


class LogWritten(Message):
    """A line from Python logging (any thread)."""

    def __init__(self, text: str, level: str):
        super().__init__()
        self.text, self.level = text, level


class AppLogHandler(logging.Handler):
    """Python logging from any thread into the run log (never onto the terminal): frankenlab's own
    warnings, and errors from anyone. Third-party warnings (torchao's "Failed to load ...so", its
    "no triton") are noise for the run's log file (`tui.noise`, OUT/run.log), not the lab's screen."""

    def __init__(self, app):
        super().__init__(logging.WARNING)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and not is_ours_logger(record.name):
            return
        try:
            self.app.post_message(LogWritten(self.format(record), record.levelname.lower()))
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class EstimateReady(Message):
    """A what-if result: scan scores (importance per layer) and/or one layer's own effects.

    `tried` maps (layer, run count) to the perplexity delta of that one change alone against the
    unmodified model: (i, 0) = layer i skipped alone (the scan's number), (i, 3) = layer i run three
    times, every other layer kept once. Never a whole plan's delta (that is the what-if line's)."""

    def __init__(
        self, text: str, scores: dict[int, float] | None = None, tried: dict[tuple[int, int], float] | None = None
    ):
        super().__init__()
        self.text, self.scores, self.tried = text, scores, tried
