"""The session recorder: a listener that builds a session from the runner's events alone.

The runner never writes the session; whoever runs a recipe (the CLI, the lab, a sweep, a test)
attaches a `SessionRecorder`, which saves the session atomically when the run starts, when each
stage starts and finishes, and when the run ends, so a crash, a kill or a cancel loses nothing
already measured. `record_run` is "run the recipe with a recorder attached" and returns the
session. The recorder runs in the runner's thread; it never raises into the run: a save that
fails (disk full, folder removed) is kept in `save_error` and retried at the next event.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from frankenlab.pipeline import events as ev
from frankenlab.pipeline.events import Listener
from frankenlab.pipeline.records import StageRecord
from frankenlab.pipeline.weight_hashes import weights_digest
from frankenlab.sessions.session import SESSION_FILE, Session


class SessionRecorder:
    """Listens to one run and keeps `session` up to date; saves to `path` (default OUT/session.json)."""

    def __init__(self, path: str | Path | None = None, *, save: bool = True, hash_weights: bool = True):
        """`save=False` keeps the session in memory only (a screen that shows a run live);
        `hash_weights=False` skips the sha256 of the weights (the saving recorder of the same run has it)."""
        self.path = Path(path) if path is not None else None
        self.save_enabled = save
        self.hash_weights = hash_weights
        self.session: Session | None = None
        self.save_error: str | None = None
        self._lock = threading.Lock()

    def __call__(self, event: ev.Event) -> None:
        with self._lock:
            handler = getattr(self, f"_on_{type(event).__name__}", None)
            if isinstance(event, ev.RunStarted):
                handler(event)
                return
            if self.session is None:  # events of a run that started before we listened
                return
            if not isinstance(event, ev.Progress):
                self.session.events.append(log_entry(event))
            if handler is not None:
                handler(event)

    # -- the events that change the record -------------------------------------------------------
    def _on_RunStarted(self, e: ev.RunStarted) -> None:
        from frankenlab.pipeline.runlock import process_identity

        self.session = Session(
            recipe=e.recipe, model_source={"ref": (e.recipe.get("model") or {}).get("source")}, owner=process_identity()
        )
        self.session.events.append(log_entry(e))
        if self.path is None:
            self.path = Path(e.out_dir) / SESSION_FILE
        self.session.stages = [
            StageRecord(s["index"], s["kind"], s.get("name", ""), s.get("params", {})) for s in e.stages
        ]
        for st in self.session.stages:
            if 0 < st.index < e.start_stage or (st.index == 0 and e.start_stage > 1):
                st.status = "skipped"  # resuming (replay --from-stage): earlier stages are not run again
        self._save()

    def _on_ModelReady(self, e: ev.ModelReady) -> None:
        s = self.session
        s.model_source = dict(e.model_source)
        s.environment = dict(e.environment)
        if not self.hash_weights:
            return
        try:
            s.model_source["weights"] = weights_digest(e.model_source.get("path"))
        except OSError as exc:
            s.model_source["weights"] = None
            s.events.append(
                ev.LogLine(
                    -1, f"could not hash the model weights ({exc}); the session records none", "warning"
                ).to_dict()
            )

    def _on_StageStarted(self, e: ev.StageStarted) -> None:
        st = self._stage(e.stage)
        if st is not None:
            st.status = "running"
        self._save()

    def _on_StageFinished(self, e: ev.StageFinished) -> None:
        record = replace(e.record)  # the session's own copy: the runner and other listeners hold the event's
        for i, st in enumerate(self.session.stages):
            if st.index == record.index:
                self.session.stages[i] = record
                break
        self._save()

    def _on_RunFailed(self, e: ev.RunFailed) -> None:
        self._stopped("failed", e)

    def _on_RunCancelled(self, e: ev.RunCancelled) -> None:
        self._stopped("cancelled", e)

    def _stopped(self, status: str, e: ev.RunFailed | ev.RunCancelled) -> None:
        """The run stopped early: the stage it stopped in (or was about to start) gets `status` and
        the message; stages that never started are skipped. The RunFinished that follows saves."""
        self.session.status = status
        for st in self.session.stages:
            if st.status == "running" or (st.index == e.stage and st.status == "pending"):
                st.status, st.error = status, e.message
            elif st.status == "pending":
                st.status = "skipped"

    def _on_RunFinished(self, e: ev.RunFinished) -> None:
        if self.session.status == "running":
            self.session.status = e.status
        for st in self.session.stages:
            if st.status == "pending":
                st.status = "skipped"
        self._save()

    # -- helpers ---------------------------------------------------------------------------------
    def _stage(self, index: int) -> StageRecord | None:
        return next((st for st in self.session.stages if st.index == index), None)

    def _save(self) -> None:
        if not self.save_enabled or self.path is None:
            return
        try:
            self.session.save(self.path)
            self.save_error = None
        except OSError as exc:
            self.save_error = (
                f"the session could not be saved to {self.path} ({exc.strerror or exc}); "
                "its numbers are kept in memory: save it elsewhere (ctrl+s in the lab)"
            )


def log_entry(event: ev.Event) -> dict:
    """The event as the session's event log keeps it (progress ticks are not logged at all).

    What the session already holds in full is not copied a second time: RunStarted is logged
    without the recipe and the planned stages, StageFinished as its stage's kind, status and
    seconds, without the record (sessions/SCHEMA.md, "Event")."""
    if isinstance(event, ev.StageFinished):
        r = event.record
        return {
            "event": "StageFinished",
            "time": event.time,
            "stage": r.index,
            "kind": r.kind,
            "status": r.status,
            "seconds": r.seconds,
        }
    d = event.to_dict()
    if isinstance(event, ev.RunStarted):
        d.pop("recipe", None)
        d.pop("stages", None)
    return d


def record_run(
    recipe,
    out_dir: str | Path,
    *,
    listener: Listener | None = None,
    listeners=(),
    session_path: str | Path | None = None,
    **kwargs,
) -> Session:
    """Run `recipe` (pipeline.runner.run_recipe) with a SessionRecorder attached; returns the session,
    saved as out_dir/session.json (or `session_path`). Other keyword arguments go to run_recipe."""
    from frankenlab.pipeline.runner import run_recipe

    recorder = SessionRecorder(session_path or Path(out_dir) / SESSION_FILE)
    every = (recorder, *listeners) + ((listener,) if listener is not None else ())
    run_recipe(recipe, out_dir, listeners=every, **kwargs)
    session = recorder.session
    session.save_error = recorder.save_error
    return session
