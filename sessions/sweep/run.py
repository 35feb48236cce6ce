"""Run a sweep: compute every missing node once, then write one session per configuration.

The scheduler plans jobs over the prefix tree (`tree.plan_jobs`), hands ready ones to an executor
(a job is ready when the node it starts from is finished), and after each job updates the sweep
record (`sweep.json`, atomic) and writes the session of every configuration whose nodes are all
finished (`configs/<slug>/session.json`, its stage records copied from the nodes, their artifact
paths pointing into `nodes/`). Finished nodes are found from their node.json files, so a rerun of
the same sweep reuses everything finished, whatever stopped the previous run. It tells a listener
what happens through the small events of `sessions.sweep.events` (the CLI's progress lines, the
lab's Sweep pane), which also writes them to sweep.log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from frankenlab.pipeline import events as ev
from frankenlab.pipeline.atomic import atomic_write_text
from frankenlab.pipeline.records import StageRecord
from frankenlab.sessions.session import Session
from frankenlab.sessions.sweep.events import (
    ConfigFinished,
    NodeFinished,
    NodeProgress,
    NodeStarted,
    SweepFinished,
    SweepLog,
    SweepStarted,
)
from frankenlab.sessions.sweep.jobs import read_node, read_progress
from frankenlab.sessions.sweep.spec import Configuration, Sweep
from frankenlab.sessions.sweep.tree import Node, build_tree, find_node, plan_jobs

RECORD_FILE = "sweep.json"
LOG_FILE = "sweep.log"
FORMAT = "frankenlab-sweep"


def load_record(out: Path) -> dict:
    try:
        data = json.loads((Path(out) / RECORD_FILE).read_text())
        return data if isinstance(data, dict) and data.get("format") == FORMAT else {}
    except (OSError, ValueError):
        return {}


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    executor=None,
    listener=None,
    cancel: threading.Event | None = None,
    data_dir: str | Path | None = None,
    configs: list[Configuration] | None = None,
) -> dict:
    """Run `sweep` into `out` (created; reused when it holds an earlier run) and return the sweep record.

    The folder is locked like a run folder (`pipeline.runlock`): a second sweep into a live sweep's
    folder raises `RunFolderBusy` before anything is written; a dead sweep's lock is taken over."""
    from frankenlab.pipeline.runlock import RunLock

    out = Path(out).resolve()
    lock = RunLock(out, what="sweep")
    took_over = lock.acquire()  # RunFolderBusy: a live sweep owns the folder
    try:
        return _run_locked(sweep, out, executor, listener, cancel, data_dir, configs, took_over or "")
    finally:
        lock.release()


def _run_locked(sweep, out, executor, listener, cancel, data_dir, configs, took_over: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cancel = cancel or threading.Event()
    tell = listener or (lambda e: None)
    configs = configs if configs is not None else sweep.expand()
    if executor is None:
        from frankenlab.sessions.sweep.executors import LocalExecutor

        executor = LocalExecutor(configs[0].recipe.model.device if configs else "auto")
    # node keys hold the device kind and dtype the jobs load the model as, where the executor runs them
    try:
        nodes, chains = build_tree(configs, resolve=getattr(executor, "resolve", None))
    except BaseException:
        executor.close()  # a Ray instance started for this sweep stops with it
        raise
    by_index = {c.index: c for c in configs}
    log = SweepLog(out / LOG_FILE, {k: n.label for k, n in nodes.items()})
    outer = tell

    def tell(e) -> None:  # noqa: F811 - the caller's listener, and sweep.log
        log(e)
        outer(e)

    previous = load_record(out)
    finished: dict[str, dict] = {k: n for k, node in nodes.items() if (n := find_node(out, node)) is not None}
    reused = set(finished)
    t_start = time.time()
    run_entry = {
        "started": t_start,
        "executor": executor.name,
        "jobs": 0,
        "nodes_computed": 0,
        "nodes_reused": len(reused),
        "status": "running",
    }
    record = _new_record(sweep, configs, nodes, chains, previous, out, run_entry)
    for k in reused:
        record["nodes"][k].update(status="done", reused=True, seconds=finished[k].get("seconds"))
    if sweep.text:
        atomic_write_text(out / "sweep.toml", sweep.text)
    state = {
        "record": record,
        "out": out,
        "nodes": nodes,
        "finished": finished,
        "chains": chains,
        "configs": by_index,
        "polled": {},  # job id -> the last progress seq read from its file (executors that cannot stream)
        "streams": getattr(executor, "streams_events", True),  # an executor without the attribute streams events
    }
    _save(state)
    jobs = {j.id: j for j in plan_jobs(nodes, set(finished))}
    tell(
        SweepStarted(
            sweep.name,
            [{"index": c.index, "label": c.label, "slug": c.slug} for c in configs],
            len(nodes),
            len({k for j in jobs.values() for k in j.keys if k not in finished}),
            executor.name,
            took_over,
        )
    )
    for c in configs:  # configurations already complete from an earlier run
        _write_config(state, c.index, tell)
    failed: dict[str, str] = {}
    running: dict = {}
    try:
        while jobs or running:
            if not cancel.is_set():
                _submit_ready(state, jobs, running, failed, executor, data_dir, tell, cancel)
            if not running:
                break
            done_futures, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for job in running.values():
                _poll_progress(state, job, tell)
            for fut in done_futures:
                job = running.pop(fut)
                try:
                    result = fut.result()
                except BaseException as exc:  # noqa: BLE001 - a Ray task killed, cancelled or crashed
                    result = {
                        "status": "cancelled" if cancel.is_set() else "failed",
                        "message": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}",
                        "nodes": [],
                        "seconds": None,
                        "cpu_seconds": None,
                    }
                _job_done(state, job, result, failed, tell)
    except KeyboardInterrupt:
        cancel.set()
        executor.cancel()
        for job in running.values():
            _job_done(state, job, {"status": "cancelled", "message": "interrupted", "nodes": []}, failed, tell)
    finally:
        if cancel.is_set():
            executor.cancel()
        executor.close()
    for key in jobs:  # never started: their start node failed, or the run was cancelled
        for k in jobs[key].keys:
            if k not in finished:
                record["nodes"][k]["status"] = "cancelled" if cancel.is_set() else "blocked"
    for c in configs:
        _write_config(state, c.index, tell, final=True)
    missing = [k for k in nodes if k not in finished]
    status = "done" if not missing else ("cancelled" if cancel.is_set() else "failed")
    record["status"] = run_entry["status"] = status
    run_entry["finished"] = time.time()
    run_entry["seconds"] = run_entry["finished"] - t_start
    _save(state)
    tell(SweepFinished(status, str(out / RECORD_FILE)))
    return record


# -- scheduling -------------------------------------------------------------------------------------
def _submit_ready(state, jobs, running, failed, executor, data_dir, tell, cancel) -> None:
    nodes, finished, record = state["nodes"], state["finished"], state["record"]
    for jid in list(jobs):
        job = jobs[jid]
        if job.depends is not None and job.depends in failed:
            for k in job.keys:
                record["nodes"][k].update(status="blocked", error=f"needs node {job.depends}, which failed")
                tell(NodeFinished(k, nodes[k].label, "blocked", None, record["nodes"][k]["error"]))
                failed[k] = "blocked"
            del jobs[jid]
    ready = [j for j in jobs.values() if j.depends is None or j.depends in finished]
    ready.sort(key=lambda j: (min(nodes[j.id].configs), nodes[j.id].index))
    for job in ready:
        if len(running) >= executor.slots:
            break
        spec = _job_spec(state, job, data_dir)
        if not state["streams"]:  # a Ray task: its progress comes through a file it rewrites
            spec["progress_file"] = True
        listener = _progress_listener(job, nodes, tell) if state["streams"] else None
        for k in job.keys:
            if k not in finished:
                record["nodes"][k].update(status="running", started=time.time())
                tell(NodeStarted(k, nodes[k].label))
        running[executor.submit(spec, listener=listener, cancel=cancel)] = job
        del jobs[job.id]
        record["runs"][-1]["jobs"] += 1
    _save(state)


def _job_spec(state, job, data_dir) -> dict:
    nodes, configs = state["nodes"], state["configs"]
    last = nodes[job.id]
    recipe = configs[last.configs[0]].recipe.to_dict()
    recipe["stages"] = recipe["stages"][: last.index]
    settled = last.loads_as  # the job loads the model exactly as its keys say (never "auto" there)
    if settled:
        recipe["model"] = {**recipe["model"], "dtype": settled["dtype"]}
        if recipe["model"].get("device", "auto") == "auto":
            recipe["model"]["device"] = settled["device"]
    start = state["finished"][job.start]["record"]["artifact"] if job.start else None
    return {
        "sweep_dir": str(state["out"]),
        "recipe": recipe,
        "keys": job.keys,
        "first": nodes[job.keys[0]].index,
        "start_artifact": start,
        "data_dir": str(data_dir) if data_dir else None,
    }


def _progress_listener(job, nodes: dict[str, Node], tell):
    first = nodes[job.keys[0]].index

    def listen(e: ev.Event) -> None:
        if isinstance(e, ev.Progress):
            i = min(max(e.stage - first, 0), len(job.keys) - 1)
            tell(NodeProgress(job.keys[i], e.fraction, e.message))

    return listen


def _poll_progress(state, job, tell) -> None:
    """A job that cannot stream its events (`streams_events` False: Ray): its progress file, when it changed."""
    if state["streams"]:
        return
    got = read_progress(state["out"], job.id)
    if got is None or got.get("seq") == state["polled"].get(job.id):
        return
    state["polled"][job.id] = got.get("seq")
    first = state["nodes"][job.keys[0]].index
    stage = int(got.get("stage") or 0)
    i = min(max(stage - first, 0), len(job.keys) - 1)
    tell(NodeProgress(job.keys[i], float(got.get("fraction") or 0.0), str(got.get("message") or "")))


def _job_done(state, job, result: dict, failed: dict, tell) -> None:
    nodes, finished, record = state["nodes"], state["finished"], state["record"]
    _poll_progress(state, job, tell)  # its last word, however short the job was
    from frankenlab.sessions.sweep.jobs import progress_path

    progress_path(state["out"], job.id).unlink(missing_ok=True)
    for k in job.keys:
        entry = record["nodes"][k]
        node = read_node(state["out"], k) if k in result.get("nodes", []) else None
        if k in finished:  # computed again inside this chain (its saved model cannot be resumed from)
            entry["computed"] = entry.get("computed", 0) + (1 if node else 0)
            continue
        if node is not None:
            finished[k] = node
            entry.update(
                status="done",
                seconds=node.get("seconds"),
                job_seconds=result.get("seconds"),
                cpu_seconds=result.get("cpu_seconds"),
                finished=time.time(),
                reused=False,
                computed=entry.get("computed", 0) + 1,
                error=None,
            )
            record["runs"][-1]["nodes_computed"] += 1
            tell(NodeFinished(k, nodes[k].label, "done", node.get("seconds")))
        else:
            status = result["status"] if result["status"] in ("failed", "cancelled") else "failed"
            entry.update(status=status, error=result.get("message") or status)
            if status == "failed":
                failed[k] = result.get("message", "")
            tell(NodeFinished(k, nodes[k].label, status, None, entry["error"]))
    for c in {c for k in job.keys for c in nodes[k].configs}:
        _write_config(state, c, tell)
    _save(state)


# -- the record and the sessions --------------------------------------------------------------------
def _new_record(sweep, configs, nodes, chains, previous, out, run_entry) -> dict:
    old_nodes = previous.get("nodes", {})
    return {
        "format": FORMAT,
        "version": 1,
        "name": sweep.name,
        "description": sweep.description,
        "source": sweep.source,
        "axes": [{"name": a.name, "values": list(a.values)} for a in sweep.axes],
        "status": "running",
        "started": previous.get("started", run_entry["started"]),
        "updated": time.time(),
        "configs": [
            {
                "index": c.index,
                "label": c.label,
                "slug": c.slug,
                "values": c.values,
                "session": f"configs/{c.slug}/session.json",
                "nodes": chains[c.index],
                "status": "pending",
            }
            for c in configs
        ],
        "nodes": {
            k: {
                "index": n.index,
                "kind": n.kind,
                "label": n.label,
                "parent": n.parent,
                "configs": n.configs,
                "shared_by": len(n.configs),
                "status": "pending",
                "computed": old_nodes.get(k, {}).get("computed", 0),
            }
            for k, n in nodes.items()
        },
        # a run still "running" in the old record was killed (kill -9, power cut): it never finished
        "runs": [
            {**r, "status": "interrupted"} if r.get("status") == "running" else r for r in previous.get("runs", [])
        ]
        + [run_entry],
    }


def _save(state) -> None:
    record = state["record"]
    record["updated"] = time.time()
    nodes = record["nodes"].values()
    record["cache_hits"] = {
        "shared": sum(max(0, n["shared_by"] - 1) for n in nodes),  # node uses beyond the first, this sweep
        "reused": sum(1 for n in nodes if n.get("reused")),  # nodes finished by an earlier run
    }
    atomic_write_text(state["out"] / RECORD_FILE, json.dumps(record, indent=2, default=str))


def _same_session(path: Path, chain: list[str]) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return data.get("status") == "done" and (data.get("sweep") or {}).get("nodes") == chain


def _write_config(state, index: int, tell, final: bool = False) -> None:
    """Write configuration `index`'s session once all its nodes finished (or, at the end, as far as it got)."""
    record, finished, out = state["record"], state["finished"], state["out"]
    chain = state["chains"][index]
    entry = next(c for c in record["configs"] if c["index"] == index)
    if entry["status"] == "done":
        return
    complete = all(k in finished for k in chain)
    if not complete and not final:
        return
    c = state["configs"][index]
    path = out / entry["session"]
    if complete and _same_session(path, chain):  # written by an earlier run from the same nodes
        entry["status"] = "done"
        tell(ConfigFinished(index, c.label, "done", str(path)))
        return
    base = finished.get(chain[0], {})
    session = Session(
        recipe=c.recipe.to_dict(),
        model_source=base.get("model_source") or {},
        environment=base.get("environment") or {},
    )
    for k in chain:
        node = state["nodes"][k]
        if k in finished:
            rec = dict(finished[k]["record"])
            if rec.get("artifact"):
                rec["artifact"] = os.path.relpath(out / rec["artifact"], path.parent)
            rec["sweep_node"] = k
            session.stages.append(StageRecord.from_dict(rec))
        else:
            st = StageRecord(
                node.index,
                node.kind,
                node.stage.get("name", ""),
                {kk: v for kk, v in node.stage.items() if kk not in ("kind", "name")},
            )
            st.status = (
                record["nodes"][k]["status"] if record["nodes"][k]["status"] in ("failed", "cancelled") else "skipped"
            )
            st.error = record["nodes"][k].get("error")
            session.stages.append(st)
    statuses = {record["nodes"][k]["status"] for k in chain}
    session.status = "done" if complete else ("cancelled" if "cancelled" in statuses else "failed")
    session.extra["sweep"] = {
        "name": record["name"],
        "config": c.label,
        "values": c.values,
        "nodes": chain,
        "record": os.path.relpath(out / RECORD_FILE, path.parent),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    session.save(path)
    entry["status"] = session.status
    tell(ConfigFinished(index, c.label, session.status, str(path)))
