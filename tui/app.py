"""The lab: a Textual app over the pipeline. Panes are widgets in `tui/widgets/`; this module wires them.

All torch work (loading, running, chatting, estimating) happens in thread workers; they talk back
with messages (`tui/messages.py`), and the app hands data down to the panes. `create_app` takes
its dependencies (a loaded model or a loader, the runner function, data and runs folders) so tests
run it on a tiny model.
"""
from __future__ import annotations

import copy
import gc
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from pipeline import events as ev
from pipeline.config import RecipeError
from pipeline.plans import LayerPlan
from pipeline.sharing import model_lock
from tui.chat import ChatTarget
from tui.messages import EstimateReady, LogWritten, ModelLoaded, ModelLoadFailed, RunEnded, RunEventArrived
from tui.screens.compare import CompareScreen
from tui.screens.help import HelpScreen
from tui.screens.prompt import PromptScreen
from tui.widgets.chat_panel import ChatPanel
from tui.widgets.layer_grid import LayerGrid
from tui.widgets.memory import MemoryPanel
from tui.widgets.model_info import ModelInfo, describe_plan
from tui.widgets.recipe_form import RecipeForm
from tui.widgets.results import ResultsPanel
from tui.widgets.run_panel import RunPanel
from tui.widgets.sessions_panel import SessionsPanel, read_session
from tui.widgets.whatif import WhatIf

TABS = ("layers", "recipe", "run", "results", "chat", "sessions")
TICK = 0.05  # seconds between event-loop latency probes


class AppLogHandler(logging.Handler):
    """Python logging from any thread into the run log (never onto the terminal)."""

    def __init__(self, app: App):
        super().__init__(logging.WARNING)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.app.post_message(LogWritten(self.format(record), record.levelname.lower()))
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class FrankenLab(App):
    CSS_PATH = "app.tcss"
    TITLE = "frankenlab"
    BINDINGS = [
        Binding("ctrl+r", "run", "Run", priority=True),
        Binding("ctrl+x", "cancel_run", "Cancel run", priority=True),
        Binding("f1,question_mark", "help", "Help"),
        Binding("ctrl+s", "save_session", "Save session", show=False),
        Binding("ctrl+o", "open_session", "Open session", show=False),
        Binding("ctrl+l", "load_recipe", "Load recipe", show=False),
        Binding("ctrl+w", "save_recipe", "Write recipe", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        *[Binding(f"{i + 1},alt+{i + 1}", f"tab('{t}')", t.capitalize(), show=False) for i, t in enumerate(TABS)],
    ]

    def __init__(self, *, model_ref: str = "default", loaded=None, loader: Callable | None = None,
                 runner: Callable | None = None, data_dir: str | Path | None = None,
                 runs_dir: str | Path = "runs", session_path: str | Path | None = None,
                 recipe: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, save_models: bool = True, chat_tokens: int = 96,
                 estimator_factory: Callable | None = None, whatif: bool = True):
        super().__init__()
        from pipeline.models import load_model
        from sessions import record_run

        self.model_ref = model_ref or "default"
        self.loaded = loaded
        self.loader = loader or load_model
        self.runner = runner or record_run
        self.data_dir = Path(data_dir) if data_dir else None
        self.runs_dir = Path(runs_dir)
        self.session_path = session_path
        self.recipe_arg = recipe
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self.save_models = save_models
        self.chat_tokens = chat_tokens
        self.estimator_factory = estimator_factory
        self.whatif_enabled = whatif
        self.session = None  # the last run's or the opened session
        self.run_dir: Path | None = None
        self.cancel_event = threading.Event()
        self.running = False
        self._last_progress: dict[int, float] = {}
        self._last_tick = time.perf_counter()
        self.tick_gaps: list[float] = []  # extra seconds between latency probes during the current run
        self._worst_gap: tuple[float, str] = (0.0, "")
        self._last_event = ""
        self._log_handler = AppLogHandler(self)

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="layers", id="tabs"):
            with TabPane("1 Layers", id="layers"):
                with VerticalScroll(id="layers-body", can_focus=False):
                    yield ModelInfo(id="model-info")
                    yield LayerGrid(id="grid")
                    yield Static("", id="plan-text")
                    yield WhatIf(id="whatif", factory=self.estimator_factory, enabled=self.whatif_enabled)
                    yield Static("space/click keep·skip  +/- repeat  0 reset  u plan→depth stage  e estimate  "
                                 "i importance scan · underlined = protected · colour = importance rank "
                                 "(green = cheapest to remove) · +3.31 = ppl delta when the cell was tried",
                                 id="grid-legend", classes="hint")
            with TabPane("2 Recipe", id="recipe"):
                yield RecipeForm(id="form")
            with TabPane("3 Run", id="run"):
                yield RunPanel(id="runpanel")
            with TabPane("4 Results", id="results"):
                with VerticalScroll(id="results-body", can_focus=False):
                    yield ResultsPanel(id="resultspanel")
                    yield MemoryPanel(id="memory")
            with TabPane("5 Chat", id="chat"):
                yield ChatPanel(id="chatpanel", max_new_tokens=self.chat_tokens)
            with TabPane("6 Sessions", id="sessions"):
                yield SessionsPanel(self.runs_dir, id="sessionspanel")
        yield Footer()

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        logging.getLogger().addHandler(self._log_handler)
        self.begin_capture_print(self.query_one(RunPanel).log_widget, stdout=True, stderr=True)
        self.set_interval(TICK, self._tick)
        self.query_one(LayerGrid).focus()
        self.query_one(RecipeForm).model_source = self.model_ref
        if self.recipe_arg:
            self._load_recipe_file(str(self.recipe_arg))
        if self.loaded is not None:
            self._model_ready(self.loaded)
        else:
            self.query_one(ModelInfo).loading(self.model_ref)
            self.load_model_worker(self.model_ref)
        if self.session_path:
            self._open_session(Path(self.session_path))

    FOCUS = {"layers": "#grid", "recipe": "#form", "run": "#run-log", "results": "#results-table",
             "chat": "#chat-input", "sessions": "#sessions-list"}

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        target = self.FOCUS.get(event.pane.id or "")
        if target:
            self.call_after_refresh(lambda: self.query_one(target).focus())

    def _handle_exception(self, error: Exception) -> None:
        # Worker results and widget messages can still be delivered while the app tears its screen
        # down; a handler that looks for a widget already removed is harmless then, not a crash.
        tearing_down = not self.screen_stack or not self.screen_stack[0].children
        if isinstance(error, NoMatches) and tearing_down:
            return
        super()._handle_exception(error)

    def on_unmount(self) -> None:
        logging.getLogger().removeHandler(self._log_handler)
        self.cancel_event.set()
        for line in self.query(WhatIf):  # an estimate in flight stops at its next layer, so exit is prompt
            if line.scheduler is not None:
                line.scheduler.cancel()

    # -- event-loop latency probe ------------------------------------------------------------
    def _tick(self) -> None:
        now = time.perf_counter()
        if self.running:
            gap = now - self._last_tick - TICK
            self.tick_gaps.append(gap)
            if gap > self._worst_gap[0]:
                self._worst_gap = (gap, self._last_event)
        self._last_tick = now

    def latency_text(self) -> str:
        if not self.tick_gaps:
            return "event loop: no samples"
        gaps = sorted(self.tick_gaps)
        p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
        return (f"event loop during the run: {len(gaps)} ticks of {TICK * 1000:.0f} ms; largest extra delay "
                f"{gaps[-1] * 1000:.0f} ms (after: {self._worst_gap[1]}), p99 {p99 * 1000:.0f} ms, "
                f"median {gaps[len(gaps) // 2] * 1000:.0f} ms")

    # -- model --------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_model_worker(self, ref: str) -> None:
        try:
            lm = self.loader(ref, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - ModelLoadError, OOM, anything: shown, the app keeps running
            self.post_message(ModelLoadFailed(f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)))
            return
        self.post_message(ModelLoaded(lm))

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self._model_ready(message.loaded)

    def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self.query_one(ModelInfo).failed(self.model_ref, message.error)
        self.query_one(RunPanel).write(f"model could not be loaded: {message.error}", "bold red")
        self.notify(message.error, title="model not loaded", severity="error", timeout=10)

    def _model_ready(self, lm) -> None:
        from pipeline.models import decoder_layers

        self.loaded = lm
        # torch, transformers and textual leave ~1M long-lived objects; a full garbage collection walks
        # them all (measured up to 300 ms, the screen frozen meanwhile). Collect once now, while the
        # user waits for the model anyway, and move the survivors out of the collector's sight
        # (unfreeze first, so a model replaced by this one can still be collected).
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.query_one(ModelInfo).show(lm)
        n = len(decoder_layers(lm.model))
        grid = self.query_one(LayerGrid)
        grid.set_layers(n, self._protected(n))
        form = self.query_one(RecipeForm)
        if form.grid_plan:
            try:
                grid.set_plan(LayerPlan.parse(form.grid_plan, n))
            except ValueError as exc:
                self.notify(f"the recipe's plan does not fit this model: {exc}", severity="warning")
        self.query_one(WhatIf).set_model(lm, self.data_dir)
        self.sub_title = f"{lm.source.name} · {n} layers"
        self._refresh_chat_targets()
        if self.session is not None:
            self._show_scores_from_session(self.session)
        self.query_one(MemoryPanel).set_model("baseline", lm.model)

    def _protected(self, n: int) -> set[int]:
        first, last = self.query_one(RecipeForm).protected
        return set(range(min(first, n))) | set(range(max(0, n - last), n))

    # -- layer grid ----------------------------------------------------------------------------
    @on(LayerGrid.PlanChanged)
    def _plan_changed(self, event: LayerGrid.PlanChanged) -> None:
        if not self.query("#plan-text"):  # a late message while the screen tears down
            return
        plan = event.plan
        self.query_one("#plan-text", Static).update(describe_plan(plan, len(event.grid.counts)))
        text = plan.to_text() if plan is not None and not plan.is_identity else None
        self.query_one(RecipeForm).set_grid_plan(text)
        self.query_one(WhatIf).plan_changed(plan, event.cell)
        self._refresh_chat_targets()

    @on(RecipeForm.Changed)
    def _form_changed(self) -> None:
        grids = self.query(LayerGrid)  # the form can report changes while the screen mounts or tears down
        if not grids:
            return
        grid = grids.first()
        if grid.counts:
            grid.set_protected(self._protected(len(grid.counts)))

    def action_use_plan(self) -> None:
        plan = self.query_one(LayerGrid).plan
        if plan is None or plan.is_identity:
            self.notify("the grid keeps every layer once: skip or repeat a layer first", severity="warning")
            return
        self.query_one(RecipeForm).use_grid_plan()
        self.notify(f"depth stage uses the plan {plan.to_text()}")

    @on(EstimateReady)
    def _estimate_ready(self, message: EstimateReady) -> None:
        grids = self.query(LayerGrid)
        if message.scores and grids:
            grids.first().set_scores(message.scores)
        if message.tried and grids:
            grids.first().set_tried(message.tried)

    def _show_scores_from_session(self, session) -> None:
        for st in session.stages:
            scores = (st.report or {}).get("scores") if st.kind == "depth" else None
            if scores:
                grid = self.query_one(LayerGrid)
                if grid.counts and all(int(k) < len(grid.counts) for k in scores):
                    grid.set_scores({int(k): float(v) for k, v in scores.items()})
                return

    # -- run -----------------------------------------------------------------------------------
    def action_run(self) -> None:
        if self.running:
            self.notify("a run is already going (ctrl+x cancels it)", severity="warning")
            return
        if self.loaded is None:
            self.notify("no model is loaded yet", severity="error")
            return
        from pipeline.models import decoder_layers

        form = self.query_one(RecipeForm)
        try:
            recipe = form.build()
            recipe.model = replace(recipe.model, source=self.model_ref)
            recipe.check_for(len(decoder_layers(self.loaded.model)))
        except (RecipeError, ValueError) as exc:
            self.notify(str(exc), title="recipe refused", severity="error", timeout=8)
            self.query_one(TabbedContent).active = "recipe"
            return
        self.start_run(recipe)

    def _new_run_dir(self, name: str) -> Path:
        """runs/<name>-<time>, as `frankenlab run` names them (suffixed when two start in one second)."""
        out = self.runs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        k = 1
        while out.exists():
            k += 1
            out = self.runs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{k}"
        return out

    def _begin_run(self, out: Path, title: str) -> None:
        self.run_dir = out
        self.cancel_event = threading.Event()
        self.running = True
        self.tick_gaps = []
        self._worst_gap = (0.0, "")
        self._last_progress = {}
        self.query_one(ResultsPanel).clear()
        panel = self.query_one(RunPanel)
        panel.reset(title)
        panel.write(title, "bold")
        self.query_one(TabbedContent).active = "run"

    def start_run(self, recipe) -> None:
        out = self._new_run_dir(recipe.name)
        stages = " + ".join(s.kind for s in recipe.stages) or "baseline evaluation only"
        self._begin_run(out, f"running {recipe.name}: {stages} -> {out}")
        self.run_worker_thread(recipe, out)

    @work(thread=True, exclusive=True, group="run", exit_on_error=False)
    def run_worker_thread(self, recipe, out: Path) -> None:
        with model_lock(self.loaded.model):  # the lab keeps its baseline; the run changes a copy
            model = copy.deepcopy(self.loaded.model)
        lm = replace(self.loaded, model=model)
        try:
            session = self.runner(recipe, out, listener=self._listener, cancel=self.cancel_event, loaded=lm,
                                  save_models=self.save_models, data_dir=self.data_dir)
        except Exception as exc:  # noqa: BLE001 - the runner catches stage errors; this is a last resort
            self.post_message(RunEnded(None, out, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(RunEnded(session, out))

    def _listener(self, e: ev.Event) -> None:
        """Runs in the run worker's thread: thin out progress events, forward everything else."""
        if isinstance(e, ev.Progress):
            now = time.monotonic()
            if e.fraction < 1.0 and now - self._last_progress.get(e.stage, 0.0) < 0.1:
                return
            self._last_progress[e.stage] = now
        self.post_message(RunEventArrived(e))

    def on_run_event_arrived(self, message: RunEventArrived) -> None:
        e = message.event
        self._last_event = f"[{e.stage}] {type(e).__name__} {getattr(e, 'message', '') or getattr(e, 'kind', '')}"[:80]
        self.query_one(RunPanel).handle(e)
        self.query_one(ResultsPanel).handle(e)
        if isinstance(e, ev.StageStarted) and e.stage > 0:
            self._reload_run_session()
        elif isinstance(e, ev.StageFinished):
            self.set_timer(1.0, self._reload_run_session)
        elif isinstance(e, ev.RunFailed):
            self.notify(e.message, title=f"run {e.error_type or 'failed'}",
                        severity="warning" if e.error_type == "cancelled" else "error", timeout=10)

    def _reload_run_session(self) -> None:
        """The runner saves session.json after every stage; read it for artifacts and footprints."""
        if self.run_dir is None or not (self.run_dir / "session.json").is_file():
            return
        try:
            s = read_session(self.run_dir / "session.json")
        except Exception:  # noqa: BLE001 - mid-write or not yet there: the next event tries again
            return
        self.session = s
        if self.running:
            panel = self.query_one(ResultsPanel)
            for st in s.stages:
                row = panel.rows.get(st.index)
                if row is not None and st.footprint:
                    from tui.widgets.results import footprint_total

                    row.footprint = footprint_total(st.footprint)
            panel.redraw()
        self._refresh_chat_targets()
        self.query_one(MemoryPanel).set_session(s)
        self._show_scores_from_session(s)

    def on_run_ended(self, message: RunEnded) -> None:
        self.running = False
        panel = self.query_one(RunPanel)
        if message.error:
            panel.write(f"the run stopped: {message.error}", "bold red")
            self.notify(message.error, title="run failed", severity="error", timeout=10)
        if message.session is not None:
            self.session = message.session
            self.query_one(ResultsPanel).show_session(message.session)
            self.query_one(MemoryPanel).set_session(message.session)
            self._show_scores_from_session(message.session)
            sev = "information" if message.session.status == "done" else "warning"
            self.notify(f"run {message.session.status}; session in {message.out_dir}", severity=sev)
        panel.write(self.latency_text(), "dim")
        self._refresh_chat_targets()
        self.query_one(SessionsPanel).refresh_list()

    def action_cancel_run(self) -> None:
        if not self.running:
            self.notify("no run is going", severity="warning")
            return
        self.cancel_event.set()
        self.query_one(RunPanel).write("cancelling after the current batch; finished stages are kept", "yellow")

    def on_log_written(self, message: LogWritten) -> None:
        style = {"error": "red", "critical": "red", "warning": "yellow"}.get(message.level, "")
        self.query_one(RunPanel).write(message.text, style)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            err = event.worker.error
            self.query_one(RunPanel).write(f"{event.worker.name} failed: {type(err).__name__}: {err}", "bold red")
            self.notify(f"{type(err).__name__}: {err}", title=f"{event.worker.name} failed", severity="error")
            if event.worker.group == "run":
                self.running = False

    # -- chat ----------------------------------------------------------------------------------
    def chat_targets(self) -> dict[str, ChatTarget]:
        targets: dict[str, ChatTarget] = {}
        lm = self.loaded
        if lm is not None:
            targets["base"] = ChatTarget("base", f"baseline ({lm.source.name})", lambda: (lm.model, lm.tokenizer))
            plan = self.query_one(LayerGrid).plan
            if plan is not None and not plan.is_identity:
                targets["plan"] = ChatTarget("plan", f"baseline + plan {plan.to_text()}",
                                             lambda: (lm.model, lm.tokenizer), plan=plan)
        if self.session is not None:
            for st in self.session.stages:
                if st.index > 0 and st.status == "done" and st.artifact and Path(st.artifact).is_dir():
                    targets[f"stage{st.index}:{st.artifact}"] = ChatTarget(
                        f"stage{st.index}", f"stage {st.index} {st.name or st.kind}",
                        self._artifact_loader(st.artifact))
        return targets

    def _artifact_loader(self, path: str) -> Callable[[], tuple]:
        def get():
            lm = self.loader(path, device=self.device, dtype=self.dtype)
            return lm.model, lm.tokenizer
        return get

    def _refresh_chat_targets(self) -> None:
        panels = self.query(ChatPanel)  # absent while the screen mounts or tears down
        if panels:
            panels.first().set_targets(self.chat_targets())

    # -- recipes and sessions --------------------------------------------------------------------
    def action_load_recipe(self) -> None:
        self.push_screen(PromptScreen("Load recipe (TOML file or bundled name):", placeholder="depth2"),
                         lambda p: p and self._load_recipe_file(p))

    def _load_recipe_file(self, path: str) -> None:
        from pipeline.recipe import Recipe

        try:
            recipe = Recipe.load(path)
        except RecipeError as exc:
            self.notify(str(exc), title="recipe not loaded", severity="error", timeout=10)
            return
        self._show_recipe(recipe)
        self.notify(f"recipe {recipe.name} loaded")

    def _show_recipe(self, recipe) -> None:
        form = self.query_one(RecipeForm)
        for note in form.load(recipe):
            self.notify(note, severity="warning")
        grid = self.query_one(LayerGrid)
        depth = next((s.config for s in recipe.stages if s.kind == "depth"), None)
        if depth is not None and grid.counts:
            n = len(grid.counts)
            try:
                if depth.plan is not None:
                    grid.set_plan(LayerPlan.parse(depth.plan, n))
                elif depth.layers is not None:
                    grid.set_plan(LayerPlan.without(n, depth.layers))
                    form.set_grid_plan(grid.plan.to_text())
            except ValueError as exc:
                self.notify(f"the recipe's plan does not fit this model: {exc}", severity="warning")

    def action_save_recipe(self) -> None:
        try:
            recipe = self.query_one(RecipeForm).build()
        except RecipeError as exc:
            self.notify(str(exc), title="recipe refused", severity="error")
            return

        def save(path: str | None) -> None:
            if path:
                try:
                    recipe.save(path)
                    self.notify(f"recipe written to {path}")
                except OSError as exc:
                    self.notify(str(exc), title="recipe not written", severity="error")
        self.push_screen(PromptScreen("Write recipe to:", f"{recipe.name}.toml"), save)

    def action_save_session(self) -> None:
        if self.session is None:
            self.notify("no session yet: run a recipe or open a session", severity="warning")
            return

        def save(path: str | None) -> None:
            if path:
                try:
                    self.session.save(path)
                    self.notify(f"session saved to {path}")
                except OSError as exc:
                    self.notify(str(exc), title="session not saved", severity="error")
        default = str(self.run_dir / "session.json") if self.run_dir else "session.json"
        self.push_screen(PromptScreen("Save session as:", default), save)

    def action_open_session(self) -> None:
        self.push_screen(PromptScreen("Open session (session.json or run folder):"),
                         lambda p: p and self._open_session(Path(p)))

    def _open_session(self, path: Path) -> bool:
        try:
            s = read_session(path)
        except Exception as exc:  # noqa: BLE001 - SessionError, bad JSON, missing file
            self.notify(str(exc), title="session not opened", severity="error", timeout=10)
            return False
        self.session = s
        self.run_dir = Path(s.path).parent if s.path else Path(path).parent
        self.query_one(ResultsPanel).show_session(s)
        self.query_one(MemoryPanel).set_session(s)
        self._show_scores_from_session(s)
        try:
            from pipeline.recipe import Recipe

            self._show_recipe(Recipe.from_dict(s.recipe))
        except RecipeError as exc:
            self.notify(f"the session's recipe cannot be shown: {exc}", severity="warning")
        self._refresh_chat_targets()
        self.query_one(TabbedContent).active = "results"
        self.notify(f"session {s.id} ({s.status}) opened")
        return True

    @on(SessionsPanel.Requested)
    def _sessions_requested(self, event: SessionsPanel.Requested) -> None:
        if event.action == "open":
            self._open_session(event.paths[0])
        elif event.action == "compare":
            sessions = []
            for p in event.paths:
                try:
                    sessions.append(read_session(p))
                except Exception as exc:  # noqa: BLE001
                    self.notify(f"{p}: {exc}", severity="error")
            if sessions:
                self.push_screen(CompareScreen(sessions))
        elif event.action == "replay":
            self.replay(event.paths[0])

    def replay(self, path: Path) -> None:
        """Re-run a saved session's recipe and compare every metric with the saved one."""
        try:
            saved = read_session(path)
        except Exception as exc:  # noqa: BLE001
            self.notify(str(exc), title="cannot replay", severity="error")
            return
        if self.running:
            self.notify("wait for the current run to finish", severity="warning")
            return
        try:
            from pipeline.recipe import Recipe

            self._show_recipe(Recipe.from_dict(saved.recipe))
        except RecipeError as exc:
            self.notify(f"the session's recipe cannot be run here: {exc}", title="cannot replay", severity="error")
            return
        name = (saved.recipe or {}).get("name", "session")
        out = self._new_run_dir(f"replay-{name}")
        self._begin_run(out, f"replaying {name} ({saved.id}) -> {out}")
        self.replay_worker_thread(saved, out)

    @work(thread=True, exclusive=True, group="run", exit_on_error=False)
    def replay_worker_thread(self, saved, out: Path) -> None:
        from sessions import replay

        def on_diff(d) -> None:
            rel = f" ({d.relative:+.2%})" if d.relative is not None else ""
            self.post_message(LogWritten(f"replay [{d.stage}] {d.name} ({d.protocol}): saved {d.saved} new {d.new}"
                                         f"{rel} {d.status}", "info" if d.status in ("ok", "same", "equal") else "warning"))
        try:
            result = replay(saved, out, model=self.model_ref, device=self.device, dtype=self.dtype,
                            data_dir=self.data_dir, listener=self._listener, cancel=self.cancel_event,
                            save_models=self.save_models, on_diff=on_diff)
        except Exception as exc:  # noqa: BLE001 - SessionError and anything else: reported, the lab goes on
            self.post_message(RunEnded(None, out, f"{type(exc).__name__}: {exc}"))
            return
        verdict = (f"replay {'reproduced' if result.ok else 'differs'}: {len(result.diffs)} metrics compared, "
                   f"{len(result.flagged)} outside tolerance {result.tolerance:.1%}")
        self.post_message(LogWritten(verdict, "info" if result.ok else "warning"))
        self.post_message(RunEnded(result.new, out))

    # -- small actions -------------------------------------------------------------------------
    def action_estimate(self) -> None:
        self.query_one(WhatIf).estimate_now()

    def action_scan(self) -> None:
        self.query_one(WhatIf).scan()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for title, help, cb in (
            ("Run the recipe", "start a run of the recipe in the Recipe pane (ctrl+r)", self.action_run),
            ("Cancel the run", "stop after the current batch, keep finished stages (ctrl+x)", self.action_cancel_run),
            ("Use the grid's plan as the depth stage", "the layer grid becomes the recipe's depth stage (u)",
             self.action_use_plan),
            ("Reset the layer plan", "keep every layer once", self.query_one(LayerGrid).action_reset),
            ("Estimate the plan's perplexity", "what-if estimate of the grid's plan (e)",
             lambda: self.query_one(WhatIf).estimate_now()),
            ("Importance scan", "perplexity without each layer, as heat colours (i)",
             lambda: self.query_one(WhatIf).scan()),
            ("Load a recipe", "read a recipe TOML into the form (ctrl+l)", self.action_load_recipe),
            ("Write the recipe", "save the form as a recipe TOML (ctrl+w)", self.action_save_recipe),
            ("Save the session as", "write the current session to a file (ctrl+s)", self.action_save_session),
            ("Open a session", "reopen a saved session (ctrl+o)", self.action_open_session),
            ("Compare sessions", "pick sessions in the Sessions pane, then Compare", lambda: self.action_tab("sessions")),
            ("Chat A/B", "answer one prompt with two models side by side",
             lambda: (self.action_tab("chat"), self.query_one(ChatPanel).select(ab=True))),
            ("New chat", "clear the chat history", lambda: self.query_one(ChatPanel).action_new_chat()),
            ("Toggle dark/light theme", "ctrl+t", self.action_toggle_theme),
            ("Help", "keys and panes (f1)", self.action_help),
        ):
            yield SystemCommand(title, help, cb)
        for i, t in enumerate(TABS):
            yield SystemCommand(f"Go to {t}", f"show the {t} pane ({i + 1})", lambda t=t: self.action_tab(t))


def create_app(**kwargs) -> FrankenLab:
    """The lab with its dependencies: loaded=LoadedModel or loader=fn, runner=fn, data_dir, runs_dir, ..."""
    return FrankenLab(**kwargs)


def run_lab(args) -> int:
    # torch keeps all its intra-op threads: heavy work runs in thread workers and releases the GIL in
    # its kernels, so the screen stays smooth even when every core computes. Measured on 2 cores
    # (bundled model, WANDA 2:4 run + evaluation): event-loop p99 extra delay 35 ms with 2 threads
    # vs 20 ms with 1, while the run took 37 s instead of 53 s and what-if toggles half the time.
    # OMP_NUM_THREADS still caps it for users who want a core left free.
    model_ref = args.model
    if model_ref is None and args.session:
        try:  # reopen on the session's own model unless --model says otherwise
            model_ref = (read_session(args.session).model_source or {}).get("ref")
        except Exception:  # noqa: BLE001 - the app reports the session error itself
            model_ref = None
    app = create_app(model_ref=model_ref or "default", data_dir=args.data_dir, session_path=args.session,
                     recipe=args.recipe, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code)
    app.run()
    return 0
