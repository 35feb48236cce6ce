"""What-if line under the layer grid: perplexity of the grid's plan on a small fixed slice.

Backed by `pipeline.whatif` (latest toggle wins through its `EstimateScheduler`). Estimates and
the importance scan run in thread workers; the line's tooltip says what the estimator holds.
A toggle shows a first answer from part of the slice at once ("≈", its coverage and standard
error), then the exact number on the full slice; the scan fills the grid coarse-first the same way.
"""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.widgets import Static
from textual.worker import get_current_worker

from frankenlab.evals.cancel import Cancelled
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.whatif import Estimate, EstimateScheduler, WhatIfEstimator
from frankenlab.tui.messages import EstimateReady


def status_line(estimator: WhatIfEstimator) -> str:
    """One line: the slice, the baseline, the cache's memory against its budget."""
    base = f"baseline ppl {estimator.baseline_ppl:.2f}" if estimator.ready else "baseline not computed yet"
    budget = "unbounded" if estimator.max_cache_bytes is None else f"{estimator.max_cache_bytes / 2**20:.0f} MiB"
    return f"what-if on {estimator.protocol}: {base}; cache {estimator.cache_bytes / 2**20:.1f} MiB of {budget}"


def estimate_line(est: Estimate) -> Text:
    """The what-if line for an estimate: a first answer says "≈", its standard error and coverage."""
    t = Text("what-if ", style="bold")
    if est.final:
        t.append(f"ppl {est.ppl:.2f} ({est.delta:+.2f} vs {est.baseline:.2f}, {est.relative:+.1%}) ")
        t.append(
            f"[{est.protocol}, {est.coverage_text}] {est.seconds:.2f}s, restarted at position {est.restarted_at}",
            style="dim",
        )
        return t
    se = f" ± {est.stderr:.2f}" if est.stderr is not None and est.stderr == est.stderr else ""
    t.append(f"ppl ≈{est.ppl:.2f}{se} ({est.delta:+.2f} vs {est.baseline:.2f}) ")
    t.append(f"[{est.protocol}, first answer on {est.coverage_text}; refining…] {est.seconds:.2f}s", style="dim")
    return t


class WhatIf(Static):
    def __init__(self, *, id: str | None = None, factory=None, enabled: bool = True):
        super().__init__("", id=id)
        self.factory = factory
        self.enabled = enabled
        self.scheduler = None
        self.plan: LayerPlan | None = None
        self.scores: dict[int, float] = {}

    def on_mount(self) -> None:
        if not self.enabled:
            self.update(Text("what-if estimates: not available here", style="dim"))

    def set_model(self, lm, data_dir) -> None:
        if not self.enabled:
            return
        make = self.factory or (lambda lm, d: WhatIfEstimator(lm.model, lm.tokenizer, data_dir=d))
        try:
            estimator = make(lm, data_dir)
        except Exception as exc:  # noqa: BLE001
            self.update(Text(f"what-if estimates unavailable: {exc}", style="dim"))
            return
        self.scheduler = EstimateScheduler(estimator)
        self.update(
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
        self.app.call_from_thread(self._show_status, scheduler.estimator)

    def _show_status(self, estimator: WhatIfEstimator) -> None:
        self.tooltip = status_line(estimator)

    def plan_changed(self, plan: LayerPlan | None, cell: int | None = None) -> None:
        """The grid's plan changed (by `cell`, if one cell's change made it): estimate it."""
        self.plan = plan
        if self.scheduler is not None and plan is not None and not plan.is_identity:
            self._estimate(plan, cell)

    def estimate_now(self) -> None:
        if self.scheduler is None:
            self.app.notify("what-if estimates are not available", severity="warning")
        elif self.plan is not None:
            self._estimate(self.plan)

    @work(thread=True, group="whatif", exit_on_error=False)
    def _estimate(self, plan: LayerPlan, cell: int | None = None) -> None:
        worker = get_current_worker()
        self.app.call_from_thread(self.update, Text(f"what-if: estimating {plan.to_text()}…", style="italic"))
        try:
            est = self.scheduler.submit(
                plan,
                lambda: worker.is_cancelled,
                on_partial=lambda e: self.app.call_from_thread(self.update, estimate_line(e)),
            )
        except Cancelled:
            return  # a newer toggle took over
        except Exception as exc:  # noqa: BLE001 - e.g. the data set is missing
            self.app.call_from_thread(self.update, Text(f"what-if failed: {exc}", style="red"))
            return
        self.app.call_from_thread(self.update, estimate_line(est))
        self.app.call_from_thread(self._show_status, self.scheduler.estimator)
        if cell is not None:
            self.post_message(EstimateReady(f"layer {cell} tried: {est.delta:+.2f}", tried={cell: est.delta}))

    def scan(self) -> None:
        if self.scheduler is None:
            self.app.notify("the importance scan needs the what-if backend", severity="warning")
            return
        self._scan()

    @work(thread=True, group="whatif-scan", exclusive=True, exit_on_error=False)
    def _scan(self) -> None:
        worker = get_current_worker()
        scores: dict[int, float] = {}
        try:
            for i, est in self.scheduler.scan(lambda: worker.is_cancelled, coarse_first=True):
                scores[i] = est.ppl
                self.post_message(
                    EstimateReady(f"layer {i}: ppl without it {est.ppl:.2f}", dict(scores), tried={i: est.delta})
                )
                phase = "exact" if est.final else f"coarse, {est.coverage_text}"
                self.app.call_from_thread(
                    self.update,
                    Text(
                        f"importance scan ({phase}): layer {i} without it: ppl "
                        f"{'' if est.final else '≈'}{est.ppl:.2f} "
                        f"[{est.protocol}]",
                        style="dim",
                    ),
                )
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001
            self.app.call_from_thread(self.update, Text(f"importance scan failed: {exc}", style="red"))
            return
        self.app.call_from_thread(
            self.update, Text(f"importance scan done: {len(scores)} layers (green = cheapest to remove)", style="dim")
        )
