"""One sweep job: run a chain of stages from a saved model, record each node, in plain data.

`run_job(spec)` is what both executors call (in a thread here, or as a Ray task on any node), so
its argument and result are JSON-able dicts and it touches only the sweep folder: the job's
session and stage models go to `nodes/<last key>/`, and each node it computes gets
`nodes/<key>/node.json`, written atomically once the node is finished. A node is finished exactly
when its node.json exists: a kill mid-job leaves no node.json, and the next run does it again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

NODE_FILE = "node.json"
PROGRESS_EVERY_S = 1.0  # a job's progress file is rewritten at most this often (and on each new stage)


def progress_path(sweep_dir: Path, last_key: str) -> Path:
    """Where a job that cannot stream its events (a Ray task) leaves its latest progress for the
    scheduler to poll: `nodes/<last key>.progress.json`, on the storage every node sees."""
    return Path(sweep_dir) / "nodes" / f"{last_key}.progress.json"


class ProgressFile:
    """A runner listener that keeps the job's latest progress in its progress file, rate-limited:
    {"stage", "fraction", "message", "time", "seq"}; `listener` (if any) still hears every event."""

    def __init__(self, path: Path, listener=None, every: float = PROGRESS_EVERY_S):
        self.path, self.listener, self.every = Path(path), listener, every
        self.last, self.stage, self.seq = 0.0, None, 0

    def __call__(self, e) -> None:
        from frankenlab.pipeline import events as ev

        if self.listener is not None:
            self.listener(e)
        if not isinstance(e, ev.Progress):
            return
        now = time.monotonic()
        if e.stage == self.stage and now - self.last < self.every and e.fraction < 1.0:
            return
        self.last, self.stage, self.seq = now, e.stage, self.seq + 1
        from frankenlab.pipeline.atomic import atomic_write_text

        record = {"stage": e.stage, "fraction": e.fraction, "message": e.message, "time": time.time(), "seq": self.seq}
        try:
            atomic_write_text(self.path, json.dumps(record))
        except OSError:
            pass  # progress is a courtesy: the job goes on


def read_progress(sweep_dir: Path, last_key: str) -> dict | None:
    try:
        data = json.loads(progress_path(sweep_dir, last_key).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "stage" in data else None


def node_dir(sweep_dir: Path, key: str) -> Path:
    return Path(sweep_dir) / "nodes" / key


def read_node(sweep_dir: Path, key: str) -> dict | None:
    """The finished node's record, or None when the node has not finished (or its files are gone)."""
    p = node_dir(sweep_dir, key) / NODE_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("status") != "done" or not isinstance(data.get("record"), dict):
        return None
    art = data["record"].get("artifact")
    if art and not (Path(sweep_dir) / art / "config.json").exists():
        return None  # its saved model was removed: compute it again
    return data


def run_job(spec: dict, listener=None, cancel=None) -> dict:
    """Run one job (see `Job`); returns {"status", "message", "nodes": [keys finished], "seconds",
    "cpu_seconds", "pid"}. Never raises for a failed stage: the status says it."""
    from frankenlab.evals.errors import ModelLoadError
    from frankenlab.pipeline.atomic import atomic_write_text
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.recorder import record_run

    t0, c0 = time.perf_counter(), time.process_time()
    sweep_dir = Path(spec["sweep_dir"]).resolve()
    recipe = Recipe.from_dict(spec["recipe"])
    if spec.get("device"):
        from dataclasses import replace

        recipe.model = replace(recipe.model, device=spec["device"])
    out = node_dir(sweep_dir, spec["keys"][-1])
    if out.exists():  # a job killed before: start clean
        shutil.rmtree(out / "stages", ignore_errors=True)
    first = spec["first"]  # index of the first node: 0 = the baseline evaluation only
    if spec.get("progress_file"):  # an executor that cannot stream events: the scheduler polls this file
        progress_path(sweep_dir, spec["keys"][-1]).unlink(missing_ok=True)  # a killed job's, from before
        listener = ProgressFile(progress_path(sweep_dir, spec["keys"][-1]), listener)
    loaded = None
    if spec.get("start_artifact"):
        try:
            loaded = load_model(
                str(sweep_dir / spec["start_artifact"]),
                device=recipe.model.device,
                dtype=recipe.model.dtype,
                trust_remote_code=recipe.model.trust_remote_code,
            )
        except ModelLoadError as exc:
            return _result("failed", f"cannot load the saved model of the node it starts from: {exc}", [], t0, c0)
    session = record_run(
        recipe,
        out,
        listener=listener,
        cancel=cancel,
        loaded=loaded,
        data_dir=spec.get("data_dir"),
        start_stage=max(first, 1),
        baseline=first == 0,
    )
    finished = []
    by_index = {st.index: st for st in session.stages}
    for key, index in zip(spec["keys"], range(first, first + len(spec["keys"])), strict=False):
        st = by_index.get(index)
        if st is None or st.status != "done":
            continue
        record = st.to_dict()
        if record.get("artifact"):
            record["artifact"] = os.path.relpath(Path(record["artifact"]).resolve(), sweep_dir)
        node = {
            "key": key,
            "index": index,
            "kind": st.kind,
            "status": "done",
            "record": record,
            "job": spec["keys"][-1],
            "session": os.path.relpath(out / "session.json", sweep_dir),
            "model_source": session.model_source,
            "environment": session.environment,
            "seconds": st.seconds,
            "finished": time.time(),
        }
        d = node_dir(sweep_dir, key)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / NODE_FILE, json.dumps(node, indent=2, default=str))
        finished.append(key)
    message = ""
    if session.status != "done":
        message = next((st.error for st in session.stages if st.error), "") or session.status
    return _result(session.status, message, finished, t0, c0)


def _result(status: str, message: str, finished: list, t0: float, c0: float) -> dict:
    return {
        "status": status,
        "message": message,
        "nodes": finished,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "pid": os.getpid(),
    }
