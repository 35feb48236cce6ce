"""The Plan pane: the best per-layer plan (skip / N:M / bits) that fits a weight budget, in the lab.

A budget (`60MiB`, `45%`, or a target name), an optional choice set (`patterns=none,2:4 bits=16,4
group=128`; empty = the planner's defaults), then Plan (enter in a field, the button, or `p`): a
thread worker reads the sensitivity table from the cache or measures what is missing on a copy of
the lab's model (minutes on the bundled model; the progress line and bar follow it, Esc or ctrl+x
cancels and what was measured stays cached), then solves the knapsack (`pipeline.planner`). The
pane shows the verdict, the chosen plan's per-layer map, the predicted front as a small braille plot
with the budget marked, and the sensitivity heat map. `u` puts the plan into the recipe form (the
app loads it as it loads a recipe file: `PlanPane.UsePlan`). One pass at a time; a cached table
makes a plan instant. The work is in `tui/widgets/plan_view.py`, the drawings in `tui/plan_render.py`.
"""

from __future__ import annotations

import threading

from rich.text import Text
from textual import on, work
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, ProgressBar, Static
from textual.worker import get_current_worker

from frankenlab.evals.errors import RecipeError
from frankenlab.tui.plan_render import front_plot, layer_map, verdict_text
from frankenlab.tui.widgets.plan_view import (
    DEFAULT_CHOICES,
    PlanRequest,
    PlanResult,
    compute_plan,
    parse_budget_text,
    parse_choices,
    plan_recipe_data,
)
from frankenlab.tui.widgets.sensitivity_map import SensitivityMap

HINT = (
    "Type a budget (60MiB, 45% of the dense bf16 weights, or a target such as siracusa) and press enter. "
    "The first plan measures every layer's sensitivities (minutes on the bundled model; cached on disk), "
    "later ones are instant."
)
KEYS = "enter/p plan · u use this plan in the recipe form · esc or ctrl+x cancel the measuring"


class PlanPane(Vertical):
    BINDINGS = [
        Binding("u", "use_plan", "Use this plan"),
        Binding("p", "plan", "Plan"),
        Binding("escape", "cancel_pass", "Cancel", show=False),
    ]

    class UsePlan(Message):
        """Load this recipe into the recipe form (the app does it, as for a recipe file)."""

        def __init__(self, recipe, summary: str):
            super().__init__()
            self.recipe, self.summary = recipe, summary

    class Progress(Message):
        def __init__(self, seq: int, fraction: float, text: str):
            super().__init__()
            self.seq, self.fraction, self.text = seq, fraction, text

    class Done(Message):
        """The worker's end: a result, or a one-line error (and the table measured so far, if any)."""

        def __init__(self, seq: int, result: PlanResult | None = None, error: str = "", table=None):
            super().__init__()
            self.seq, self.result, self.error, self.table = seq, result, error, table

    def __init__(self, *, id: str | None = None, cache_dir=None, windows=None):
        super().__init__(id=id)
        self.cache_dir, self.windows = cache_dir, windows  # None: the planner's cache folder and windows
        self.lm = None
        self.facts = None
        self.data_dir = None
        self.model_ref = "default"
        self.cancel = threading.Event()
        self.running: int | None = None  # the seq of the request in the worker
        self.stale: int | None = None  # the seq of a request for a model the lab no longer shows
        self.seq = 0
        self.result: PlanResult | None = None
        self.table = None  # the last table shown (complete or not)
        self.message = ""  # the status line's text (tests read it)

    @property
    def busy(self) -> bool:
        return self.running is not None

    def compose(self) -> ComposeResult:
        with Horizontal(id="plan-controls"):
            yield Label("budget", classes="plan-label")
            yield Input(placeholder="60MiB, 45%, siracusa", id="plan-budget", compact=True)
            yield Label("choices", classes="plan-label")
            yield Input(placeholder=DEFAULT_CHOICES, id="plan-choices", compact=True)
            yield Button("Plan", id="plan-go", compact=True, variant="primary")
        yield Static(HINT, id="plan-status", markup=False)
        yield ProgressBar(total=1.0, show_eta=False, id="plan-progress")
        with VerticalScroll(id="plan-body"):
            yield Static("", id="plan-verdict", markup=False)
            yield Static("", id="plan-layers", markup=False)
            yield Static("", id="plan-front", markup=False)
            with HorizontalScroll(id="plan-heat-box", can_focus=False):
                yield SensitivityMap(id="plan-heat")
            yield Static(KEYS, id="plan-keys", classes="hint", markup=False)

    def on_mount(self) -> None:
        self.query_one("#plan-progress").display = False

    # -- the model -------------------------------------------------------------------------------
    def set_model(self, lm, data_dir, model_ref: str) -> None:
        """The lab's (new) model: what was shown belongs to the old one; a pass for it stops."""
        from frankenlab.pipeline.planner.budget import ModelFacts

        if self.busy:
            self.cancel.set()
            self.stale = self.running
        self.lm, self.data_dir, self.model_ref = lm, data_dir, model_ref
        self.result, self.table = None, None
        try:
            self.facts = ModelFacts.from_config(lm.model.config.to_dict())
        except RecipeError as exc:
            self.facts = None
            self._status(f"the planner cannot price this model: {exc}", "red")
        self._show(None)

    # -- requests (main thread) ------------------------------------------------------------------
    def _status(self, text: str, style: str = "") -> None:
        self.message = text
        self.query_one("#plan-status", Static).update(Text(text, style=style))

    def _request(self) -> PlanRequest | None:
        """The inputs checked: a request, or None with a one-line message saying what to do."""
        if self.lm is None or self.facts is None:
            self._status("no model to plan for yet: wait for it to load (Layers pane)", "yellow")
            return None
        try:
            budget = parse_budget_text(self.query_one("#plan-budget", Input).value, self.facts)
            choices = parse_choices(self.query_one("#plan-choices", Input).value)
        except RecipeError as exc:
            self._status(str(exc).splitlines()[0], "bold red")
            return None
        self.seq += 1
        return PlanRequest(
            self.lm,
            self.facts,
            budget,
            choices,
            data_dir=self.data_dir,
            cache_dir=self.cache_dir,
            windows=self.windows,
            seq=self.seq,
        )

    @on(Input.Submitted, "#plan-budget, #plan-choices")
    @on(Button.Pressed, "#plan-go")
    def action_plan(self) -> None:
        if self.busy:
            self.app.notify(
                "a sensitivity pass is running: wait for it, or esc / ctrl+x cancels it", severity="warning"
            )
            return
        req = self._request()
        if req is None:
            return
        self.cancel = threading.Event()
        self.running = req.seq
        self._status(f"planning within {req.budget.label}: reading the sensitivities…", "italic")
        self._worker(req, self.cancel, self.result.table if self.result is not None else None)

    def action_cancel_pass(self) -> None:
        """Esc: stop the measuring (what was measured stays cached); not measuring, Esc is the lab's."""
        if not self.cancel_pass():
            raise SkipAction()

    def cancel_pass(self) -> bool:
        if not self.busy or self.cancel.is_set():
            return False
        self.cancel.set()
        self._status("cancelling: the entries measured so far stay in the cache…", "yellow")
        return True

    def action_use_plan(self) -> None:
        from frankenlab.pipeline.recipe import Recipe
        from frankenlab.pipeline.units import fmt_bytes

        r = self.result
        if r is None:
            self.app.notify("no plan yet: type a budget and press enter", severity="warning")
            return
        if r.chosen is None:
            self.app.notify("no plan fits the budget: nothing to put into the recipe form", severity="warning")
            return
        try:
            import tomli_w

            # the recipe's TOML text, read back as a recipe file is (what `frankenlab plan --out` writes)
            recipe = Recipe.loads(tomli_w.dumps(plan_recipe_data(r, self.model_ref)))
        except RecipeError as exc:
            self.app.notify(f"the plan does not make a recipe here: {exc}", severity="error")
            return
        stages = ", ".join(s.kind for s in recipe.stages) or "no stage (the model unchanged)"
        summary = (
            f"recipe form: the plan {fmt_bytes(r.chosen.bytes)} (predicted ppl {r.chosen.ppl:.4g}) "
            f"as {stages}; see the Recipe pane (2)"
        )
        self.post_message(self.UsePlan(recipe, summary))

    # -- the worker ------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def _worker(self, req: PlanRequest, cancel: threading.Event, previous) -> None:
        from frankenlab.evals.cancel import Cancelled

        worker = get_current_worker()

        def cancelled() -> bool:
            return cancel.is_set() or worker.is_cancelled

        def progress(fraction: float, text: str) -> None:
            self.post_message(self.Progress(req.seq, fraction, text))

        try:
            result = compute_plan(req, cancelled=cancelled, progress=progress, previous=previous)
        except Cancelled as exc:
            self.post_message(self.Done(req.seq, error="cancelled", table=getattr(exc, "table", None)))
        except RecipeError as exc:
            self.post_message(self.Done(req.seq, error=str(exc).splitlines()[0]))
        except Exception as exc:  # noqa: BLE001 - out of memory, a broken data set: one line, the lab goes on
            first = (str(exc).strip().splitlines() or [""])[0]
            self.post_message(self.Done(req.seq, error=f"{type(exc).__name__}: {first}"))
        else:
            self.post_message(self.Done(req.seq, result))

    @on(Progress)
    def _progress(self, message: Progress) -> None:
        if message.seq != self.running or self.cancel.is_set():
            return
        bar = self.query_one("#plan-progress", ProgressBar)
        bar.display = True
        bar.update(progress=message.fraction)
        self._status(f"sensitivities {message.fraction:.0%}: {message.text} · esc or ctrl+x cancels", "italic")

    @on(Done)
    def _done(self, message: Done) -> None:
        if message.seq != self.running:
            return
        self.running = None
        self.query_one("#plan-progress", ProgressBar).display = False
        if message.seq == self.stale or (
            message.result is not None and message.result.request.lm is not self.lm
        ):  # the model changed meanwhile: nothing of it belongs on screen
            self._status("the model changed: press enter to plan for the new one", "yellow")
            return
        if message.error:
            if message.error == "cancelled":
                done = "" if message.table is None else f" ({self._entries(message.table)} entries measured)"
                self._status(f"cancelled: what was measured stays in the cache{done}; enter resumes", "yellow")
                if message.table is not None:
                    self.table = message.table
                    self.query_one("#plan-heat", SensitivityMap).show(message.table)
            else:
                self._status(f"plan failed: {message.error}", "bold red")
            return
        self.result = message.result
        self._show(message.result)

    @staticmethod
    def _entries(table) -> str:
        return f"{sum(map(len, table.deltas.values()))} of {table.layers * len(table.measured_options())}"

    # -- showing ---------------------------------------------------------------------------------
    def _show(self, r: PlanResult | None) -> None:
        verdict_w = self.query_one("#plan-verdict", Static)
        layers_w, front_w = self.query_one("#plan-layers", Static), self.query_one("#plan-front", Static)
        heat = self.query_one("#plan-heat", SensitivityMap)
        if r is None:
            verdict_w.update("")
            layers_w.update("")
            front_w.update("")
            heat.show(None)
            return
        self.table = r.table
        verdict_w.update(verdict_text(r.front, r.request.budget, r.chosen))
        layers_w.update(
            layer_map(r.chosen, r.front.layers, r.table.options)
            if r.chosen is not None
            else Text("no plan to show per layer: raise the budget or widen the choices", style="dim")
        )
        front_w.update(front_plot(r.front, r.request.budget.bytes, r.chosen))
        heat.show(r.table)
        how = "from the cache" if not r.measured else f"{r.measured} entries measured now"
        note = f" ({r.request.budget.note})" if r.request.budget.note else ""
        ref = f" around {r.table.around}" if r.table.around is not None else ""
        self._status(
            f"budget {r.request.budget.label}{note} · sensitivities{ref} {how} "
            f"({r.table.layers} layers x {len(r.table.options)} options) · u puts the plan into the recipe form"
        )
