"""Pieces shared by the headless subcommands."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def ctrl_c_cancels(console, verb: str = "cancelling") -> tuple[threading.Event, Callable[[], None]]:
    """First Ctrl-C (or SIGTERM, as a job queue or `kill` sends) sets the returned event (the runner
    stops after the current batch and keeps what it measured); a second stops at once. Returns the
    event and a function restoring the old handlers. Off the main thread (tests driving a command)
    signals cannot be handled, so only the event is given."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return cancel, lambda: None

    def on_signal(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        console.print(f"[yellow]{what}: {verb} after the current step (Ctrl-C again to stop now)...[/yellow]")

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return cancel, restore
