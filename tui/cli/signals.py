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
        cancel.reason = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"  # the runner's message names it
        cancel.set()
        what = cancel.reason
        console.print(f"[yellow]{what}: {verb} after the current step (Ctrl-C again to stop now)...[/yellow]")

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return cancel, restore


def cancelled_exit_code(cancel: threading.Event | None) -> int:
    """The exit status of a cancelled command: 143 (128 + 15) when SIGTERM cancelled it, as job
    queues and `timeout` expect; 130 (128 + 2) for Ctrl-C."""
    return 143 if getattr(cancel, "reason", None) == "SIGTERM" else 130
