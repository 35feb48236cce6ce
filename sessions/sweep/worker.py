"""One sweep job in its own process (the local executor with several GPUs, `sessions.sweep.executors`).

`run_in_process(spec, env)` starts `python -m frankenlab.sessions.sweep.worker` with `env` (only the
job's GPU visible through `CUDA_VISIBLE_DEVICES`), hands it the job's spec as one JSON line, and
returns `run_job`'s result from the child's last line. The child's progress comes back as JSON lines
and reaches the listener as the runner's `Progress` events, so the CLI's bars and the lab's Sweep
pane move as for a job in this process. A cancel is the word `cancel` on the child's stdin (a closed
stdin, the parent gone, counts as one); a child that does not stop within `CANCEL_GRACE_S` is ended.
Everything else the child prints goes to `nodes/<last key>.log` in the sweep folder.
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
from pathlib import Path

CANCEL_GRACE_S = 10.0


def log_path(spec: dict) -> Path:
    return Path(spec["sweep_dir"]) / "nodes" / f"{spec['keys'][-1]}.log"


def run_in_process(spec: dict, env: dict, listener=None, cancel: threading.Event | None = None) -> dict:
    from frankenlab.pipeline import events as ev

    log = log_path(spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        err.write(f"frankenlab sweep job {spec['keys'][-1]}, started {time.ctime()}\n")
        err.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "frankenlab.sessions.sweep.worker"],
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

    reader = threading.Thread(target=read, name="sweep-worker-reader", daemon=True)
    reader.start()
    result: dict | None = None
    asked = None
    try:
        _tell(proc, json.dumps({**spec, "sys_path": sys.path}))
        while True:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                line = ""
            if line is None:
                break
            msg = _parse(line)
            if msg.get("event") == "progress" and listener is not None:
                listener(
                    ev.Progress(int(msg.get("stage", 0)), float(msg.get("fraction", 0.0)), str(msg.get("message", "")))
                )
            elif msg.get("event") == "result":
                result = msg.get("result")
            if cancel is not None and cancel.is_set() and asked is None:
                asked = time.monotonic()
                _tell(proc, "cancel")
            if asked is not None and time.monotonic() - asked > CANCEL_GRACE_S and proc.poll() is None:
                _end(proc)
        proc.wait()
    except BaseException:
        _end(proc)
        raise
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        reader.join(1.0)
    if isinstance(result, dict):
        return result
    how = f"was killed by signal {-proc.returncode}" if (proc.returncode or 0) < 0 else f"exited with {proc.returncode}"
    return {
        "status": "cancelled" if asked is not None else "failed",
        "message": f"the job's process {how} without a result (log: {log})",
        "nodes": [],
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": None,
        "pid": proc.pid,
    }


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
    except (OSError, ValueError):
        pass


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the child -------------------------------------------------------------------------------------
def _child() -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the JSON lines to the parent
    os.dup2(2, 1)  # whatever else is printed goes to the log
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to pass on, as a cancel
    lock = threading.Lock()

    def send(**msg) -> None:
        with lock:
            channel.write(json.dumps(msg, default=str) + "\n")
            channel.flush()

    spec = json.loads(sys.stdin.readline())
    sys.path[:0] = [p for p in spec.pop("sys_path", []) if p not in sys.path]
    cancel = threading.Event()

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() == "cancel":
                cancel.set()
        cancel.set()  # stdin closed: the parent is gone

    threading.Thread(target=listen, name="cancel-listener", daemon=True).start()
    from frankenlab.pipeline import events as ev
    from frankenlab.sessions.sweep.jobs import run_job

    def listener(e) -> None:
        if isinstance(e, ev.Progress):
            send(event="progress", stage=e.stage, fraction=e.fraction, message=e.message)

    result = run_job(spec, listener=listener, cancel=cancel)
    send(event="result", result=result)
    return 0


def main() -> None:
    try:
        rc = _child()
    except BaseException:  # noqa: BLE001 - the traceback goes to the log; the parent reports the exit
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # gptqmodel's threads can abort the interpreter at its normal exit


if __name__ == "__main__":
    main()
