"""One sweep job in its own process (the local executor with several GPUs, `sessions.sweep.executors`).

`run_in_process(spec, env)` starts `python -m frankenlab.sessions.sweep.worker` with `env` (only the
job's GPU visible through `CUDA_VISIBLE_DEVICES`), hands it the job's spec as one JSON line, and
returns `run_job`'s result from the child's last line. The child's progress comes back as JSON lines
and reaches the listener as the runner's `Progress` events, so the CLI's bars and the lab's Sweep
pane move as for a job in this process. The process, its JSON lines and its cancel are
`pipeline.worker_process`'s (a child that does not stop within `CANCEL_GRACE_S` of a cancel is
ended). Everything else the child prints goes to `nodes/<last key>.log` in the sweep folder.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from frankenlab.pipeline.worker_process import child_channel, child_exit, supervise

CANCEL_GRACE_S = 10.0


def log_path(spec: dict) -> Path:
    return Path(spec["sweep_dir"]) / "nodes" / f"{spec['keys'][-1]}.log"


def run_in_process(spec: dict, env: dict, listener=None, cancel: threading.Event | None = None) -> dict:
    from frankenlab.pipeline import events as ev

    log = log_path(spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict | None = None

    def on_message(msg: dict) -> None:
        nonlocal result
        if msg.get("event") == "progress" and listener is not None:
            listener(
                ev.Progress(int(msg.get("stage", 0)), float(msg.get("fraction", 0.0)), str(msg.get("message", "")))
            )
        elif msg.get("event") == "result":
            result = msg.get("result")

    returncode, asked, pid = supervise(
        "frankenlab.sessions.sweep.worker",
        {**spec, "sys_path": sys.path},
        log,
        f"frankenlab sweep job {spec['keys'][-1]}",
        on_message,
        lambda: cancel is not None and cancel.is_set(),
        grace=CANCEL_GRACE_S,
        env=env,
    )
    if isinstance(result, dict):
        return result
    how = f"was killed by signal {-returncode}" if (returncode or 0) < 0 else f"exited with {returncode}"
    return {
        "status": "cancelled" if asked else "failed",
        "message": f"the job's process {how} without a result (log: {log})",
        "nodes": [],
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": None,
        "pid": pid,
    }


# -- the child -------------------------------------------------------------------------------------
def _child() -> int:
    send, spec, cancel = child_channel()
    from frankenlab.pipeline import events as ev
    from frankenlab.sessions.sweep.jobs import run_job

    def listener(e) -> None:
        if isinstance(e, ev.Progress):
            send(event="progress", stage=e.stage, fraction=e.fraction, message=e.message)

    result = run_job(spec, listener=listener, cancel=cancel)
    send(event="result", result=result)
    return 0


def main() -> None:
    child_exit(_child)


if __name__ == "__main__":
    main()
