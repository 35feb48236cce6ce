"""Pieces shared by the headless subcommands."""
from __future__ import annotations

import signal
import threading
from typing import Callable


def ctrl_c_cancels(console, verb: str = "cancelling") -> tuple[threading.Event, Callable[[], None]]:
    """First Ctrl-C sets the returned event (the runner stops after the current batch and keeps what it
    measured); a second Ctrl-C stops at once. Returns the event and a function restoring the old handler.
    Off the main thread (tests driving a command) signals cannot be handled, so only the event is given."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return cancel, lambda: None

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        console.print(f"[yellow]{verb} after the current batch (Ctrl-C again to stop now)...[/yellow]")

    old = signal.signal(signal.SIGINT, on_sigint)
    return cancel, lambda: signal.signal(signal.SIGINT, old)
