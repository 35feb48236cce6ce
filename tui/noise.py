"""Third-party noise goes to the run's log file, not the terminal; real errors still show.

On every run torchao logs "Failed to load ... .so" for kernels this machine cannot use, torch
warns about `_pytree` deprecations through its own stderr handlers, and transformers raises
FutureWarnings. None of it is ours to act on, and in the lab it would tear the screen. So:
- Python warnings raised from third-party files go to the log; warnings from our own packages
  (evals, pipeline, sessions, tui) still print;
- logging records below ERROR from third-party loggers go to the log (the root handler and
  torch's own handlers alike); ERROR and above, and anything our packages log, still print;
- exceptions are untouched: a real failure is reported as before.
Records are buffered until a command names its log file (`attach`: `frankenlab run` uses
OUT/run.log, `frankenlab eval --json X` uses X.log); otherwise they go to
`$FRANKENLAB_CACHE/logs/` (default ~/.cache/frankenlab/logs/) when the process exits.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from frankenlab.pipeline.atomic import open_append

OURS = ("evals", "pipeline", "sessions", "tui", "benchmarks", "tests")  # folders under _ROOT
_ROOT = Path(__file__).resolve().parent.parent  # the checkout, or site-packages/frankenlab when installed


def _is_ours_file(filename: str) -> bool:
    try:
        rel = Path(filename).resolve().relative_to(_ROOT)
    except (ValueError, OSError):
        return False
    return rel.parts[0] in OURS and "site-packages" not in rel.parts


def is_ours_logger(name: str) -> bool:
    return name.split(".")[0] in ("frankenlab", "benchmarks", "tests", "__main__")


class NoiseLog:
    """Collects third-party lines; writes them to a file once one is attached."""

    def __init__(self):
        self.lines: list[str] = []
        self.path: Path | None = None
        self.count = 0

    def write(self, text: str) -> None:
        self.count += 1
        line = f"{time.strftime('%H:%M:%S')} {text.rstrip()}\n"
        if self.path is None:
            self.lines.append(line)
            return
        try:
            with open_append(self.path) as f:  # never through a symbolic link
                f.write(line)
        except OSError:
            self.lines.append(line)

    def attach(self, path: str | os.PathLike) -> Path | None:
        """From now on (and everything buffered so far) into `path`; None (still buffering) when
        the file cannot be written: the command reports its own folder problem."""
        p = Path(path)
        try:
            with open_append(p) as f:  # the output-path guard: a linked run.log is refused, not followed
                f.writelines(self.lines)
        except OSError:
            return None
        self.lines, self.path = [], p
        return p

    def flush_default(self) -> None:
        if self.lines and self.path is None:
            base = Path(
                os.environ.get("FRANKENLAB_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "frankenlab"
            )
            self.attach(base / "logs" / f"frankenlab-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


class _Router(logging.Handler):
    """The root handler: third-party records below ERROR to the log, the rest to stderr as well."""

    def __init__(self, log: NoiseLog, terminal: bool = True):
        super().__init__(logging.DEBUG)
        self.log, self.terminal = log, terminal
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.log.write(text)
            if self.terminal and (record.levelno >= logging.ERROR or is_ours_logger(record.name)):
                sys.stderr.write(text + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class _Divert(logging.Filter):
    """On torch's own stderr handlers: records below ERROR go to the log instead."""

    def __init__(self, log: NoiseLog):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or is_ours_logger(record.name):
            return True
        self.log.write(f"{record.levelname} {record.name}: {record.getMessage()}")
        return False


def divert_stream_handlers(log: NoiseLog, prefix: str = "torch") -> int:
    """Put a `_Divert` filter on every stream handler of loggers under `prefix`; how many."""
    n = 0
    names = [prefix] + [k for k in logging.Logger.manager.loggerDict if k.startswith(prefix + ".")]
    for name in names:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not any(isinstance(f, _Divert) for f in h.filters):
                h.addFilter(_Divert(log))
                n += 1
    return n


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback` once module `name` has finished importing (torch makes its handlers last)."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                callback()

        spec.loader = Loader()
        return spec


_INSTALLED: NoiseLog | None = None


def route(*, terminal: bool = True) -> NoiseLog:
    """Install the routing once per process; returns the log to `attach` a file to. `terminal=False`
    (the lab, which shows warnings in its own run log) prints nothing to stderr from the root handler."""
    global _INSTALLED
    if _INSTALLED is not None:
        return _INSTALLED
    log = _INSTALLED = NoiseLog()
    root = logging.getLogger()
    root.addHandler(_Router(log, terminal))
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_ours_file(filename):
            return shown(message, category, filename, lineno, file, line)
        log.write(f"{category.__name__} {filename}:{lineno}: {message}")

    warnings.showwarning = showwarning
    if "torch" in sys.modules:
        divert_stream_handlers(log)
    else:
        sys.meta_path.insert(0, _AfterImport("torch", lambda: divert_stream_handlers(log)))
    atexit.register(log.flush_default)
    return log


def attach(path: str | os.PathLike) -> Path | None:
    """Send third-party noise to `path` (e.g. the run folder's run.log), if routing is on."""
    return _INSTALLED.attach(path) if _INSTALLED is not None else None
