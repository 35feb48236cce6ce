"""What-if line under the layer grid: perplexity of the grid's plan on a small fixed slice.

Backed by `pipeline.whatif` (latest request wins through its `EstimateScheduler`). Estimates and
the importance scan run in thread workers; the line's tooltip says what the estimator holds.
A toggle shows a first answer from part of the slice at once ("≈", with its interval), then the
exact number on the full slice; the scan fills the grid coarse-first the same way.

A number on the line always belongs to the plan printed beside it, and that plan is the grid's:
- the main thread orders the requests: it takes the scheduler's ticket when the key is handled
  (`_request`), so an older plan can never hold a newer ticket, whatever order the workers run in;
- every answer (first answer, memo answer, final) comes back to the main thread with the request
  it answers, and is shown only if that request is still the newest, its plan is still the one
  on screen and its scheduler (so its model) is still this line's (`_current`);
- a plan that keeps every layer (a reset) or none takes a ticket too and clears the line.
After the plan's number, the cell that was changed gets its own effect (that layer's change
alone, every other layer kept: `EstimateReady.tried`), never the plan's total.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import work
from textual.widgets import Static
from textual.worker import get_current_worker

from frankenlab.evals.cancel import Cancelled
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.whatif import Estimate, EstimateScheduler, WhatIfEstimator
from frankenlab.pipeline.whatif.progressive import interval_text
from frankenlab.tui.messages import EstimateReady


def status_line(estimator: WhatIfEstimator) -> str:
    """One line: the slice, the baseline, the cache's memory against its budget."""
    base = f"baseline ppl {estimator.baseline_ppl:.2f}" if estimator.ready else "baseline not computed yet"
    budget = "unbounded" if estimator.max_cache_bytes is None else f"{estimator.max_cache_bytes / 2**20:.0f} MiB"
    return f"what-if on {estimator.protocol}: {base}; cache {estimator.cache_bytes / 2**20:.1f} MiB of {budget}"


def _ranges(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> "2-4,7"."""
    out, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(out)


def plan_short(plan: LayerPlan) -> str:
    """The plan in a few characters: "skip 20-23", "skip 2 repeat 3x2", "unchanged", or its order."""
    if plan.is_identity:
        return "unchanged"
    counts = plan.counts()
    if list(plan.order) != sorted(plan.order):  # reordered: only the full order says it
        return f"order {plan.to_text()}"
    parts = []
    if plan.skipped:
        parts.append(f"skip {_ranges(plan.skipped)}")
    if plan.repeated:
        parts.append("repeat " + ",".join(f"{i}x{counts[i]}" for i in plan.repeated))
    return " ".join(parts)


def estimate_line(est: Estimate, plan_text: str | None = None) -> Text:
    """The what-if line for an estimate of the plan `plan_text` (its short text, printed beside the number).

    A first answer says "≈" and carries its interval (`progressive.interval_text`): with the coverage
    a benchmark measured for it where that reached the claimed level, else labelled a rough guess."""
    t = Text(f"what-if {plan_text}: " if plan_text else "what-if ", style="bold")
    if est.final:
        t.append(f"ppl {est.ppl:.2f} ({est.delta:+.2f} vs baseline {est.baseline:.2f}, {est.relative:+.1%}) ")
        how = "remembered" if est.layers_run == 0 else f"{est.seconds:.2f}s"
        t.append(f"[{est.protocol}, {est.coverage_text}] {how}", style="dim")
        return t
    t.append(f"ppl ≈{est.ppl:.2f} ({est.delta:+.2f} vs baseline {est.baseline:.2f}) ")
    t.append(f"[{interval_text(est)} from {est.coverage_text}; refining…]", style="dim")
    return t


def grid_legend(protocol: str = "") -> str:
    """The hint under the grid: keys, and what a cell's number means (measured on `protocol`)."""
    on = f" on {protocol}" if protocol else ""
    why = (
        "; the what-if slice is small so a toggle answers in seconds, the Run and Results panes use the "
        "recipe's evaluation protocol: their baselines differ"
        if protocol
        else ""
    )
    return (
        "space/click keep·skip  +/- repeat  0 reset  u plan→depth stage  e estimate  i importance scan · "
        "underlined = protected · colour = importance rank (green = cheapest to remove) · "
        f"+3.31 = that layer's change alone (skipped, or repeated as shown), ppl vs the unmodified model{on}; "
        f"the whole plan's delta is on the what-if line{why}"
    )


def alone(plan: LayerPlan, cell: int) -> LayerPlan:
    """The unmodified model with only `cell` changed as `plan` changes it (skipped or run n times)."""
    counts = [1] * plan.n_source
    counts[cell] = plan.counts()[cell]
    return LayerPlan.from_counts(counts)


@dataclass(frozen=True, eq=False)
class Request:
    """One what-if request as the main thread made it: its ticket, plan (None: the scan) and scheduler."""

    ticket: int
    plan: LayerPlan | None
    scheduler: EstimateScheduler
    cell: int | None = None


class WhatIf(Static):
    def __init__(self, *, id: str | None = None, factory=None, enabled: bool = True):
        super().__init__("", id=id)
        self.factory = factory
        self.enabled = enabled
        self.scheduler: EstimateScheduler | None = None
        self.plan: LayerPlan | None = None
        self.scores: dict[int, float] = {}
        self._latest: Request | None = None  # the newest request (main thread only)
        self.shown: tuple[LayerPlan, Estimate] | None = None  # the plan and estimate the line shows a number of

    @property
    def protocol(self) -> str:
        return self.scheduler.estimator.protocol if self.scheduler is not None else ""

    def on_mount(self) -> None:
        if not self.enabled:
            self.update(Text("what-if estimates: not available here", style="dim"))

    def _say(self, text: Text) -> None:
        """Show a line without a number (main thread)."""
        self.shown = None
        self.update(text)

    def set_model(self, lm, data_dir) -> None:
        if not self.enabled:
            return
        if self.scheduler is not None:
            self.scheduler.cancel()  # whatever runs for the old model stops, and can never be shown
        self.scheduler, self._latest = None, None
        make = self.factory or (lambda lm, d: WhatIfEstimator(lm.model, lm.tokenizer, data_dir=d))
        try:
            estimator = make(lm, data_dir)
        except Exception as exc:  # noqa: BLE001
            self._say(Text(f"what-if estimates unavailable: {exc}", style="dim"))
            return
        self.scheduler = EstimateScheduler(estimator)
        self._say(
            Text(
                "what-if: toggle a layer (or press e) to estimate the plan's perplexity; "
                "i scans every layer's importance",
                style="dim",
            )
        )
        self._warm_up(self.scheduler)

    @work(thread=True, group="whatif-warm", exclusive=True, exit_on_error=False)
    def _warm_up(self, scheduler) -> None:
        """The baseline pass in the background, so the first toggle costs what every other one does.

        Silent: a failure here (say the data set is missing) is reported by the first estimate, with
        the user looking. A toggle during the warm-up waits for it, it does not start a second one.
        """
        worker = get_current_worker()
        try:
            scheduler.prepare(lambda: worker.is_cancelled)
        except Exception:  # noqa: BLE001 - see the docstring
            return
        self.app.call_from_thread(self._show_status, scheduler)

    def _show_status(self, scheduler: EstimateScheduler) -> None:
        if scheduler is self.scheduler:
            self.tooltip = status_line(scheduler.estimator)

    # -- requests (main thread) ------------------------------------------------------------------
    def _request(self, plan: LayerPlan | None, cell: int | None = None) -> Request:
        """The newest request from now on: every earlier one is stale, in the scheduler and on this line."""
        req = Request(self.scheduler.ticket(), plan, self.scheduler, cell)
        self._latest = req
        return req

    def _current(self, req: Request) -> bool:
        """Whether an answer to `req` may be shown: newest request, same plan on screen, same model."""
        return (
            req is self._latest
            and req.scheduler is self.scheduler
            and req.scheduler.is_current(req.ticket)
            and (req.plan is None or (self.plan is not None and self.plan.order == req.plan.order))
        )

    def plan_changed(self, plan: LayerPlan | None, cell: int | None = None) -> None:
        """The grid's plan changed (by `cell`, if one cell's change made it): estimate it, or clear the line."""
        self.plan = plan
        if self.scheduler is None:
            return
        if plan is None or plan.is_identity:
            self._request(plan)  # whatever is in flight is stale now
            self._say(self._idle_text(plan))
            return
        self._estimate(self._request(plan, cell))
        self._say(Text(f"what-if {plan_short(plan)}: estimating…", style="italic"))

    def _idle_text(self, plan: LayerPlan | None) -> Text:
        if plan is None:
            return Text("what-if: every layer skipped, nothing to estimate", style="dim")
        est = self.scheduler.estimator
        base = f": baseline ppl {est.baseline_ppl:.2f} [{est.protocol}]" if est.ready else ""
        return Text(f"what-if: the plan keeps every layer{base}", style="dim")

    def estimate_now(self) -> None:
        if self.scheduler is None:
            self.app.notify("what-if estimates are not available", severity="warning")
        elif self.plan is not None:
            self.plan_changed(self.plan)

    # -- answers (main thread) -------------------------------------------------------------------
    def _show(self, req: Request, est: Estimate) -> None:
        if not self._current(req) or est.plan_text != req.plan.to_text():
            return
        self.shown = (req.plan, est)
        self.update(estimate_line(est, plan_short(req.plan)))

    def _failed(self, req: Request, error: str) -> None:
        if self._current(req):
            self._say(Text(f"what-if failed: {error}", style="red"))

    def _own_effect(self, req: Request, key: tuple[int, int], est: Estimate) -> None:
        """One layer's change alone, for its cell: valid while the model is (the plan may have moved on)."""
        if req.scheduler is self.scheduler:
            what = "skipped" if key[1] == 0 else f"run {key[1]} times"
            self.post_message(EstimateReady(f"layer {key[0]} {what} alone: {est.delta:+.2f}", tried={key: est.delta}))

    @work(thread=True, group="whatif", exit_on_error=False)
    def _estimate(self, req: Request) -> None:
        worker = get_current_worker()
        cancelled = lambda: worker.is_cancelled  # noqa: E731
        try:
            est = req.scheduler.submit(
                req.plan,
                cancelled,
                on_partial=lambda e: self.app.call_from_thread(self._show, req, e),
                ticket=req.ticket,
            )
            self.app.call_from_thread(self._show, req, est)
            self.app.call_from_thread(self._show_status, req.scheduler)
            if req.cell is not None and req.plan.counts()[req.cell] != 1:
                single = alone(req.plan, req.cell)
                own = est if single.order == req.plan.order else None
                if own is None:
                    own = req.scheduler.submit(single, cancelled, ticket=req.ticket, record=False)
                key = (req.cell, req.plan.counts()[req.cell])
                self.app.call_from_thread(self._own_effect, req, key, own)
        except Cancelled:
            return  # a newer request took over
        except Exception as exc:  # noqa: BLE001 - e.g. the data set is missing
            self.app.call_from_thread(self._failed, req, str(exc))

    # -- the importance scan ---------------------------------------------------------------------
    def scan(self) -> None:
        if self.scheduler is None:
            self.app.notify("the importance scan needs the what-if backend", severity="warning")
            return
        self._say(Text("importance scan: starting…", style="dim"))
        self._scan(self._request(None))

    def _scan_step(self, req: Request, text: Text, scores: dict[int, float] | None, i: int | None, est) -> None:
        if req.scheduler is not self.scheduler:
            return  # another model's numbers
        if i is not None:
            self.post_message(
                EstimateReady(f"layer {i}: ppl without it {est.ppl:.2f}", scores, tried={(i, 0): est.delta})
            )
        if self._current(req):
            self._say(text)

    @work(thread=True, group="whatif-scan", exclusive=True, exit_on_error=False)
    def _scan(self, req: Request) -> None:
        worker = get_current_worker()
        scores: dict[int, float] = {}
        try:
            for i, est in req.scheduler.scan(lambda: worker.is_cancelled, coarse_first=True, ticket=req.ticket):
                scores[i] = est.ppl
                phase = "exact" if est.final else f"rough, {est.coverage_text}"
                text = Text(
                    f"importance scan ({phase}): layer {i} without it: ppl "
                    f"{'' if est.final else '≈'}{est.ppl:.2f} [{est.protocol}]",
                    style="dim",
                )
                self.app.call_from_thread(self._scan_step, req, text, dict(scores), i, est)
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001
            text = Text(f"importance scan failed: {exc}", style="red")
            self.app.call_from_thread(self._scan_step, req, text, None, None, None)
            return
        text = Text(f"importance scan done: {len(scores)} layers (green = cheapest to remove)", style="dim")
        self.app.call_from_thread(self._scan_step, req, text, None, None, None)
