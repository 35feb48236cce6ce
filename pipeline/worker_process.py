"""A job in a worker process that speaks JSON lines: the parent's half and the child's half.

Two things run this way: a stage whose library may exit or abort the process (`pipeline.child_stage`)
and a sweep job pinned to one GPU (`sessions.sweep.worker`). The protocol is the same:
- the parent starts `python -m MODULE` and writes the job as one JSON line on its stdin;
- the child answers with JSON lines on its stdout (its real stdout; whatever else it prints, and
  its tracebacks, go to the log file the parent gave it as stderr);
- a cancel is the word `cancel` on the child's stdin (a closed stdin, the parent gone, counts as
  one); a child that does not stop within `grace` seconds is ended, and a parent that is itself
  interrupted never leaves its child behind.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


def supervise(
    module: str,
    job: dict,
    log: Path,
    header: str,
    on_message: Callable[[dict], None],
    cancelled: Callable[[], bool],
    *,
    grace: float,
    env: dict | None = None,
) -> tuple[int, bool, int]:
    """Run `python -m module` on `job`, hand each JSON line it sends to `on_message`, pass on a
    cancel; returns (its return code, whether a cancel was asked, its pid)."""
    with open(log, "w") as err:
        err.write(f"{header}, started {time.ctime()}\n")
        err.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            bufsize=1,
            env=env,
        )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for line in proc.stdout:
                lines.put(line)
        except (OSError, ValueError):
            pass
        lines.put(None)

    reader = threading.Thread(target=read, name=f"{module}-reader", daemon=True)
    reader.start()
    asked = exited = None
    try:
        _tell(proc, json.dumps(job, default=str))  # a child that died at once is told by its log
        while True:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                line = ""
                if proc.poll() is not None:  # a process it started may hold the pipe open: do not wait on it
                    exited = exited or time.monotonic()
                    if time.monotonic() - exited > 2.0:
                        break
            if line is None:
                break
            msg = _parse(line)
            if msg:
                on_message(msg)
            if cancelled() and asked is None:
                asked = time.monotonic()
                _tell(proc, "cancel")
            if asked is not None and time.monotonic() - asked > grace and proc.poll() is None:
                end(proc)
        proc.wait()
    except BaseException:  # KeyboardInterrupt, a listener's error: the child must not outlive its parent
        end(proc)
        raise
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        reader.join(1.0)
        if not reader.is_alive():  # else a process the child started still holds the pipe: left to the reader
            proc.stdout.close()
    return proc.returncode, asked is not None, proc.pid


def _parse(line: str) -> dict:
    try:
        msg = json.loads(line)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


def _tell(proc: subprocess.Popen, word: str) -> None:
    try:
        proc.stdin.write(word + "\n")
        proc.stdin.flush()
    except (OSError, ValueError):  # it has gone already
        pass


def end(proc: subprocess.Popen) -> None:
    """Terminate, then kill after 2 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the child's half ------------------------------------------------------------------------------
def child_channel() -> tuple[Callable[..., None], dict, threading.Event]:
    """In the child: (send(**msg) to the parent, the job, the cancel event). From here on, print and
    tracebacks go to the log; Ctrl-C is the parent's to pass on, as a cancel."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the JSON lines to the parent
    os.dup2(2, 1)  # whatever else is printed goes to the log
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()

    def send(**msg) -> None:
        with lock:
            channel.write(json.dumps(msg, default=str) + "\n")
            channel.flush()

    job = json.loads(sys.stdin.readline())
    sys.path[:0] = [p for p in job.pop("sys_path", []) if p not in sys.path]  # the parent's, for its modules
    cancel = threading.Event()

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() == "cancel":
                cancel.set()
        cancel.set()  # stdin closed: the parent is gone

    threading.Thread(target=listen, name="cancel-listener", daemon=True).start()
    return send, job, cancel


def child_exit(run: Callable[[], int]) -> None:
    """Run the child's work and leave with its code; a traceback goes to the log (exit 1). The exit
    skips interpreter teardown: gptqmodel's threads can abort the interpreter at a normal exit, and
    everything is written by then."""
    try:
        rc = run()
    except BaseException:  # noqa: BLE001 - the traceback goes to the log; the parent reports the exit
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
