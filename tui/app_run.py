"""The lab's runs and replays: starting one, the live session while it goes, its end, cancelling.

A mixin of `tui.app.FrankenLab` (handlers by name: Textual's `@on` needs the app's own class).
The run itself is `LabState.run` / `LabState.replay` in a thread worker; its events come back as
`RunEventArrived` messages: the Run and Results panes read them (a `StageFinished` holds the stage
record: counts, footprint, metrics), and they feed the live session (`LabState.apply`), which gives
the Memory pane its footprints and the chat its stage models as each stage ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from textual import work
from textual.widgets import TabbedContent
from textual.worker import Worker, WorkerState

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import events as ev
from frankenlab.pipeline.atomic import open_append
from frankenlab.sessions import SessionError, load_session
from frankenlab.tui import noise
from frankenlab.tui.lab_state import replay_diff_line, replay_verdict
from frankenlab.tui.messages import LogWritten, RunEnded, RunEventArrived
from frankenlab.tui.widgets.memory import MemoryPanel
from frankenlab.tui.widgets.recipe_form import RecipeForm
from frankenlab.tui.widgets.results import ResultsPanel
from frankenlab.tui.widgets.run_panel import RunPanel
from frankenlab.tui.widgets.sessions_panel import SessionsPanel


def write_run_log(out: Path, line: str) -> None:
    """One line into the run folder's run.log (beside the third-party noise); never raises."""
    try:
        with open_append(Path(out) / "run.log") as f:
            f.write(line.rstrip() + "\n")
    except OSError:
        pass


class RunActions:
    def action_run(self) -> None:
        if self.lab.running:
            self.notify("a run is already going (ctrl+x cancels it)", severity="warning")
            return
        if self.lab.loaded is None:
            self.notify("no model is loaded yet", severity="error")
            return
        try:
            recipe = self.query_one(RecipeForm).build()
            recipe.model = replace(recipe.model, source=self.lab.model_ref)
            recipe.check_for(self.lab.n_layers)
        except (RecipeError, ValueError) as exc:
            self.notify(str(exc), title="recipe refused", severity="error", timeout=8)
            self.query_one(TabbedContent).active = "recipe"
            return
        out = self.lab.begin_run(recipe.name)
        stages = " + ".join(s.kind for s in recipe.stages) or "baseline evaluation only"
        self._show_run_start(f"running {recipe.name}: {stages} -> {out}", out)
        self.run_worker_thread(out, lambda: (self._estimate(recipe), self.lab.run(recipe, out, self._listener))[1])

    def _estimate(self, recipe) -> None:
        """In the run's worker thread, before it starts: the estimated duration on the Run pane
        (`pipeline.estimate`, probing the loaded model when the rate cache is cold; FRANKENLAB_ESTIMATE=0: none)."""
        import os

        if os.environ.get("FRANKENLAB_ESTIMATE", "1") == "0":
            return
        try:
            from frankenlab.pipeline.estimate import estimate_recipe

            estimate = estimate_recipe(recipe, self.lab.data_dir, loaded=self.lab.loaded)
        except Exception as exc:  # noqa: BLE001 - an estimate never stops a run
            self.call_from_thread(self.query_one(RunPanel).write, f"no duration estimate: {type(exc).__name__}", "dim")
            return
        self.call_from_thread(self.query_one(RunPanel).show_estimate, estimate)

    def _show_run_start(self, title: str, out: Path) -> None:
        noise.attach(out / "run.log")  # third-party warnings of this run into its folder, not the screen
        self.probe.start()
        self.query_one(ResultsPanel).clear()
        panel = self.query_one(RunPanel)
        panel.reset(title)
        panel.write(title, "bold")
        self.query_one(TabbedContent).active = "run"

    @work(thread=True, exclusive=True, group="run", exit_on_error=False)
    def run_worker_thread(self, out: Path, job: Callable) -> None:
        try:
            session = job()
        except Exception as exc:  # noqa: BLE001 - the runner catches stage errors; this is a last resort
            self.post_message(RunEnded(None, out, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(RunEnded(session, out))

    def _listener(self, e: ev.Event) -> None:
        """Runs in the run worker's thread: thin out progress events, forward everything else."""
        if self.lab.forward(e):
            self.post_message(RunEventArrived(e))

    def on_run_event_arrived(self, message: RunEventArrived) -> None:
        e = message.event
        what = getattr(e, "message", "") or getattr(e, "kind", "")
        self.probe.last_event = f"[{e.stage}] {type(e).__name__} {what}"[:80]
        self.query_one(RunPanel).handle(e)
        self.query_one(ResultsPanel).handle(e)
        if self.lab.apply(e):  # a stage record arrived: footprint, artifact, scores
            self.query_one(MemoryPanel).set_session(self.lab.session)
            self._show_scores(self.lab.session)
            self._refresh_chat_targets()
        elif isinstance(e, ev.RunFailed):
            self.notify(e.message, title="run failed", severity="error", timeout=10)

    def on_run_ended(self, message: RunEnded) -> None:
        self.lab.end_run(message.session)
        self.probe.stop()
        panel = self.query_one(RunPanel)
        if message.error:
            panel.write(f"the run stopped: {message.error}", "bold red")
            self.notify(message.error, title="run failed", severity="error", timeout=10)
        if message.session is not None:
            self._show_session(message.session)
            status = message.session.status
            sev = "information" if status == "done" else "warning"
            kept = sum(1 for st in message.session.stages if st.index > 0 and st.status == "done")
            what = f"run {status}" + (f" ({kept} finished stage(s) kept)" if status == "cancelled" else "")
            self.notify(f"{what}; session in {message.out_dir}", severity=sev)  # the one toast of a cancel
        write_run_log(message.out_dir, self.probe.text())  # a measurement for developers: the file only
        self._refresh_chat_targets()
        self.query_one(SessionsPanel).refresh_list()

    def action_cancel_run(self, hint: str = "") -> None:
        """Ask the run to stop; said in the Run pane now, and in one notification once it has stopped."""
        if not self.lab.running:
            self.notify("no run is going", severity="warning")
            return
        self.lab.cancel.set()
        panel = self.query_one(RunPanel)
        panel.write(f"cancelling after the current step; finished stages are kept{hint}", "yellow")
        panel.status("cancelling after the current step…")

    def replay(self, path: Path) -> None:
        """Re-run a saved session's recipe and compare every metric with the saved one."""
        try:
            saved = load_session(path)
        except SessionError as exc:
            self.notify(str(exc), title="cannot replay", severity="error")
            return
        if self.lab.running:
            self.notify("wait for the current run to finish", severity="warning")
            return
        problem = self._show_saved_recipe(saved)
        if problem:
            self.notify(f"the session's recipe cannot be run here: {problem}", title="cannot replay", severity="error")
            return
        name = (saved.recipe or {}).get("name", "session")
        out = self.lab.begin_run(f"replay-{name}")
        self._show_run_start(f"replaying {name} ({saved.id}) -> {out}", out)
        self.run_worker_thread(out, lambda: self._replay_job(saved, out))

    def _replay_job(self, saved, out: Path):
        """(thread) The replay, its per-metric lines and its verdict in the run log; returns the new session."""

        def on_diff(d) -> None:
            self.post_message(LogWritten(*replay_diff_line(d)))

        result = self.lab.replay(saved, out, self._listener, on_diff)
        self.post_message(LogWritten(*replay_verdict(result)))
        return result.new

    # -- the run log: Python logging and workers that failed ---------------------------------------
    def on_log_written(self, message: LogWritten) -> None:
        style = {"error": "red", "critical": "red", "warning": "yellow"}.get(message.level, "")
        self.query_one(RunPanel).write(message.text, style)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            err = event.worker.error
            self.query_one(RunPanel).write(f"{event.worker.name} failed: {type(err).__name__}: {err}", "bold red")
            self.notify(f"{type(err).__name__}: {err}", title=f"{event.worker.name} failed", severity="error")
            if event.worker.group == "run":
                self.lab.end_run(None)
                self.probe.stop()
