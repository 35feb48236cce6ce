"""The lab: a Textual app over the pipeline. Panes are widgets in `tui/widgets/`; this module wires them.

What the lab holds and decides (the model, the session, run folders, chat targets, replay text)
is `tui.lab_state.LabState`, free of Textual; the app hands its data down to the panes and turns what
the panes and the thread workers say (messages, `tui/messages.py`) into calls on it. Runs and
replays are wired in `tui/app_run.py`, recipe and session files in `tui/app_files.py`, panes and
their focus in `tui/app_panes.py`, ctrl+c and quitting during a job in `tui/app_quit.py`, the
command palette's entries are `tui/palette.py`. All torch work happens in thread workers.
`create_app` takes the dependencies (a loaded model or a loader, the runner function, data and
runs folders) so tests run it on a tiny model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Header, Static, TabbedContent, TabPane

from frankenlab.pipeline.plans import LayerPlan
from frankenlab.sessions import SessionError, load_session
from frankenlab.tui.app_files import FileActions
from frankenlab.tui.app_panes import LabTabs, PaneActions
from frankenlab.tui.app_quit import QuitActions
from frankenlab.tui.app_run import RunActions
from frankenlab.tui.lab_state import LabState, layer_scores, protected_layers
from frankenlab.tui.latency import TICK, LatencyProbe
from frankenlab.tui.messages import AppLogHandler, EstimateReady, ModelLoaded, ModelLoadFailed
from frankenlab.tui.palette import TABS, lab_commands
from frankenlab.tui.screens.help import HelpScreen
from frankenlab.tui.widgets.chat_panel import ChatPanel
from frankenlab.tui.widgets.footer import LabFooter
from frankenlab.tui.widgets.layer_grid import LayerGrid
from frankenlab.tui.widgets.memory import MemoryPanel
from frankenlab.tui.widgets.model_info import ModelInfo, describe_plan
from frankenlab.tui.widgets.plan_pane import PlanPane
from frankenlab.tui.widgets.recipe_form import RecipeForm
from frankenlab.tui.widgets.results import ResultsPanel
from frankenlab.tui.widgets.run_panel import RunPanel
from frankenlab.tui.widgets.sessions_panel import SessionsPanel
from frankenlab.tui.widgets.sweep_pane import SweepPane
from frankenlab.tui.widgets.whatif import WhatIf, grid_legend


class FrankenLab(RunActions, FileActions, PaneActions, QuitActions, App):
    CSS_PATH = "app.tcss"
    TITLE = "frankenlab"
    BINDINGS = [
        Binding("ctrl+r", "run", "Run", priority=True),
        Binding("ctrl+x", "cancel_run", "Cancel", priority=True),
        # the first ctrl+c cancels a running job, as in `frankenlab run`; idle, it is Textual's (copy)
        Binding("ctrl+c", "interrupt", "Cancel the run", show=False, priority=True),
        # pane keys that arrive while typing, in xterm, tmux, GNOME, iTerm2 alike (alt+digit often
        # arrives as ESC and a digit, which Textual reads as another character); any number of panes
        Binding("ctrl+pagedown", "next_tab(1)", "Next pane", show=False, priority=True),
        Binding("ctrl+pageup", "next_tab(-1)", "Previous pane", show=False, priority=True),
        Binding("escape", "leave_input", "Leave the input", show=False),
        Binding("f1,question_mark", "help", "Help"),
        Binding("ctrl+s", "save_session", "Save session", show=False),
        Binding("ctrl+o", "open_session", "Open session", show=False),
        Binding("ctrl+l", "load_recipe", "Load recipe", show=False),
        Binding("ctrl+w", "save_recipe", "Write recipe", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        *[Binding(f"{i + 1},alt+{i + 1}", f"tab('{t}')", t.capitalize(), show=False) for i, t in enumerate(TABS)],
    ]

    def notify(self, message: str, *, title: str = "", severity="information", timeout=None, markup: bool = False):
        """Every notification is plain text: a message quoting a recipe (`add [[stages]] kind = "gptq"`)
        or a path with brackets must show as written, not be eaten as Rich markup (widgets' `notify`
        passes markup=True, so it is ignored here: no notification of the lab uses markup)."""
        return super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def __init__(
        self,
        *,
        model_ref: str = "default",
        loaded=None,
        loader: Callable | None = None,
        runner: Callable | None = None,
        data_dir: str | Path | None = None,
        runs_dir: str | Path = "runs",
        session_path: str | Path | None = None,
        recipe: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        save_models: bool = True,
        chat_tokens: int = 96,
        estimator_factory: Callable | None = None,
        whatif: bool = True,
    ):
        super().__init__()
        self._widgets: dict = {}  # _cached
        self._pane_seq = 0  # pane requests (keys, palette), numbered: LabTabs drops stale focus
        self._auto_focus: dict[str, int] = {}  # pane -> the request at which the lab last focused it
        from frankenlab.pipeline.loading import load_model
        from frankenlab.sessions import record_run

        self.lab = LabState(
            loader=loader or load_model,
            runner=runner or record_run,
            runs_dir=runs_dir,
            data_dir=data_dir,
            model_ref=model_ref,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            save_models=save_models,
        )
        self.first_model, self.session_path, self.recipe_arg = loaded, session_path, recipe
        self.chat_tokens, self.estimator_factory, self.whatif_enabled = chat_tokens, estimator_factory, whatif
        self.probe = LatencyProbe()
        self._log_handler = AppLogHandler(self)

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with LabTabs(initial="layers", id="tabs"):
            with TabPane("1 Layers", id="layers"):
                with VerticalScroll(id="layers-body", can_focus=False):
                    yield ModelInfo(id="model-info")
                    yield LayerGrid(id="grid")
                    yield Static("", id="plan-text")
                    yield WhatIf(id="whatif", factory=self.estimator_factory, enabled=self.whatif_enabled)
                    yield Static(grid_legend(), id="grid-legend", classes="hint")
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
                yield SessionsPanel(self.lab.runs_dir, id="sessionspanel")
            with TabPane("7 Sweep", id="sweep"):
                yield SweepPane(self.lab.runs_dir, self.lab.data_dir, id="sweeppane")
            with TabPane("8 Plan", id="plan"):
                yield PlanPane(id="planpane")
        yield LabFooter(compact=True)  # at 80 columns the keys that matter on every pane still show

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        logging.getLogger().addHandler(self._log_handler)
        self.begin_capture_print(self.query_one(RunPanel).log_widget, stdout=True, stderr=True)
        self.set_interval(TICK, self.probe.tick)
        if not self.session_path:  # a focus call switches tabs: it would pull a reopened session back to Layers
            self.query_one(LayerGrid).focus()
        self.query_one(RecipeForm).model_source = self.lab.model_ref
        if self.recipe_arg:
            self._load_recipe_file(str(self.recipe_arg))
        if self.first_model is not None:
            self._model_ready(self.first_model)
        else:
            self.query_one(ModelInfo).loading(self.lab.model_ref)
            self.load_model_worker(self.lab.model_ref)
        if self.session_path:
            self._open_session(Path(self.session_path))

    @on(SweepPane.OpenSession)
    def _open_sweep_session(self, event: SweepPane.OpenSession) -> None:
        self._open_session(event.path)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if (event.pane.id or "") in self.FOCUS:
            self.call_after_refresh(self._focus_pane, event.pane.id)

    def _cached(self, selector):
        """The one widget `selector` names, looked up once: a DOM query walks every widget of the
        lab, and tab switches asked for the same few on every key (None while none is mounted)."""
        widget = self._widgets.get(selector)
        if widget is None or not widget.is_attached:
            found = self.query(selector)
            widget = self._widgets[selector] = found.first() if found else None
        return widget

    def _handle_exception(self, error: Exception) -> None:
        # Worker results and widget messages can still be delivered while the app tears its screen
        # down; a handler that looks for a widget already removed is harmless then, not a crash.
        tearing_down = not self.screen_stack or not self.screen_stack[0].children
        if isinstance(error, NoMatches) and tearing_down:
            return
        super()._handle_exception(error)

    def on_unmount(self) -> None:
        logging.getLogger().removeHandler(self._log_handler)
        self.lab.cancel.set()
        for pane in self.query(PlanPane):  # a sensitivity pass stops at its next layer (its entries are cached)
            pane.cancel.set()
        for line in self.query(WhatIf):  # an estimate in flight stops at its next layer, so exit is prompt
            if line.scheduler is not None:
                line.scheduler.cancel()

    # -- model --------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_model_worker(self, ref: str) -> None:
        try:
            lm = self.lab.load(ref)
        except Exception as exc:  # noqa: BLE001 - ModelLoadError, OOM, anything: shown, the app keeps running
            self.post_message(ModelLoadFailed(str(exc) or type(exc).__name__))
            return
        self.post_message(ModelLoaded(lm))

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self._model_ready(message.loaded)

    def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self.query_one(ModelInfo).failed(self.lab.model_ref, message.error)
        self.query_one(RunPanel).write(f"model could not be loaded: {message.error}", "bold red")
        self.notify(message.error, title="model not loaded", severity="error", timeout=10)

    def _model_ready(self, lm) -> None:
        n = self.lab.model_ready(lm)
        self.query_one(ModelInfo).show(lm)
        self.query_one(LayerGrid).set_layers(n, self._protected(n))
        plan_text = self.query_one(RecipeForm).grid_plan
        if plan_text:
            self._grid_plan_from(lambda n: LayerPlan.parse(plan_text, n))
        whatif = self.query_one(WhatIf)
        whatif.set_model(lm, self.lab.data_dir)
        self.query_one("#grid-legend", Static).update(grid_legend(whatif.protocol))
        self.sub_title = f"{lm.source.name} · {n} layers"
        self._refresh_chat_targets()
        if self.lab.session is not None:
            self._show_scores(self.lab.session)
        self.query_one(MemoryPanel).set_model("baseline", lm.model)
        self.query_one(PlanPane).set_model(lm, self.lab.data_dir, self.lab.model_ref)

    def _protected(self, n: int) -> set[int]:
        return protected_layers(n, *self.query_one(RecipeForm).protected)

    # -- layer grid ----------------------------------------------------------------------------
    @on(LayerGrid.PlanChanged)
    def _plan_changed(self, event: LayerGrid.PlanChanged) -> None:
        if not self.query("#plan-text"):  # a late message while the screen tears down
            return
        plan = event.plan
        self.query_one("#plan-text", Static).update(describe_plan(plan, len(event.grid.counts)))
        self.query_one(RecipeForm).set_grid_plan(plan.to_text() if plan is not None and not plan.is_identity else None)
        self.query_one(WhatIf).plan_changed(plan, event.cell)
        self._refresh_chat_targets()

    @on(RecipeForm.Changed)
    def _form_changed(self) -> None:
        grid = self._cached(LayerGrid)  # the form can report changes while the screen mounts or tears down
        if grid is not None and grid.counts:
            grid.set_protected(self._protected(len(grid.counts)))

    def _grid_plan_from(self, make: Callable[[int], LayerPlan | None]) -> None:
        """Show `make(n_layers)` in the grid (and the form); a plan that does not fit is a warning."""
        grid = self.query_one(LayerGrid)
        try:
            plan = make(len(grid.counts))
        except ValueError as exc:
            self.notify(f"the recipe's plan does not fit this model: {exc}", severity="warning")
            return
        if plan is not None:
            grid.set_plan(plan)
            form = self.query_one(RecipeForm)
            if form.grid_plan != plan.to_text():
                form.set_grid_plan(plan.to_text())

    def action_use_plan(self) -> None:
        plan = self.query_one(LayerGrid).plan
        if plan is None or plan.is_identity:
            self.notify("the grid keeps every layer once: skip or repeat a layer first", severity="warning")
            return
        self.query_one(RecipeForm).use_grid_plan()
        self.notify(f"depth stage uses the plan {plan.to_text()}")

    @on(PlanPane.UsePlan)
    def _use_planner_plan(self, message: PlanPane.UsePlan) -> None:
        """The Plan pane's `u`: its plan into the recipe form, as a recipe file is loaded (`_show_recipe`)."""
        self._show_recipe(message.recipe)
        self.notify(message.summary)

    def action_cancel_run(self, hint: str = "") -> None:
        """ctrl+x: the run; with no run going, the Plan pane's sensitivity pass."""
        plan = self._cached(PlanPane)
        if not self.lab.running and plan is not None and plan.cancel_pass():
            return
        super().action_cancel_run(hint)

    @on(EstimateReady)
    def _estimate_ready(self, message: EstimateReady) -> None:
        for grid in self.query(LayerGrid):
            if message.scores:
                grid.set_scores(message.scores)
            if message.tried:
                grid.set_tried(message.tried)

    def _show_scores(self, session) -> None:
        grid = self.query_one(LayerGrid)
        scores = layer_scores(session, len(grid.counts)) if grid.counts else None
        if scores:
            grid.set_scores(scores)

    # -- chat ----------------------------------------------------------------------------------
    def chat_targets(self) -> dict:
        return self.lab.chat_targets(self.query_one(LayerGrid).plan)

    def _refresh_chat_targets(self) -> None:
        panels = self.query(ChatPanel)  # absent while the screen mounts or tears down
        if panels:
            panels.first().set_targets(self.chat_targets())

    # -- small actions -------------------------------------------------------------------------
    def action_estimate(self) -> None:
        self.query_one(WhatIf).estimate_now()

    def action_scan(self) -> None:
        self.query_one(WhatIf).scan()

    def action_focus_memory(self) -> None:
        self.query_one(MemoryPanel).focus_selector()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for title, help, callback in lab_commands(self):
            yield SystemCommand(title, help, callback)


def create_app(**kwargs) -> FrankenLab:
    """The lab with its dependencies: loaded=LoadedModel or loader=fn, runner=fn, data_dir, runs_dir, ..."""
    return FrankenLab(**kwargs)


def run_lab(args) -> int:
    # torch keeps all its intra-op threads: heavy work runs in thread workers and releases the GIL in
    # its kernels, so the screen stays smooth even when every core computes. Measured on 2 cores
    # (bundled model, WANDA 2:4 run + evaluation): event-loop p99 extra delay 35 ms with 2 threads
    # vs 20 ms with 1, while the run took 37 s instead of 53 s and what-if toggles half the time.
    # OMP_NUM_THREADS still caps it for users who want a core left free.
    import sys

    from frankenlab.tui.model_cache import max_models

    try:
        max_models()  # a bad FRANKENLAB_MAX_MODELS is one line before the screen opens
    except ValueError as exc:
        print(f"frankenlab: {exc}", file=sys.stderr)
        return 2
    model_ref = args.model
    if model_ref is None and args.session:
        try:  # reopen on the session's own model unless --model says otherwise
            model_ref = (load_session(args.session).model_source or {}).get("ref")
        except SessionError:  # the app reports the session error itself
            model_ref = None
    app = create_app(
        model_ref=model_ref or "default",
        data_dir=args.data_dir,
        session_path=args.session,
        recipe=args.recipe,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    app.run()
    return 0
