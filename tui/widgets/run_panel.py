"""The run pane: one progress bar per stage and the run's log.

The app forwards runner events here (attributes down); the panel never touches the runner itself.
"""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, ProgressBar, RichLog, Static

from frankenlab.pipeline import events as ev

_RANKING = {"k", "metric", "protected_first", "protected_last", "samples"}
# The fields a stage kind ignores, given the others: a depth stage with a layer plan (or explicit
# layers) ranks nothing; ranked by L1 weight size it reads no calibration samples.
NOT_APPLYING = {
    "depth": lambda p: (
        _RANKING if p.get("plan") or p.get("layers") else {"samples"} if p.get("metric") == "l1" else set()
    ),
}


def settings_text(kind: str, params: dict | None) -> str:
    """A stage's settings as `k=2, metric=perplexity`: the fields that apply, no raw dict.

    Unset fields (None, empty) are left out, and so are those the kind ignores because another is
    given (a depth stage with a layer plan does not rank layers: no k, metric or protection)."""
    shown = {k: v for k, v in (params or {}).items() if v is not None and v != "" and v != [] and v != {}}
    ignored = NOT_APPLYING[kind](shown) if kind in NOT_APPLYING else set()
    shown = {k: v for k, v in shown.items() if k not in ignored}
    return ", ".join(f"{k}={_value_text(v)}" for k, v in shown.items())


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_value_text(x) for x in v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_value_text(x)}" for k, x in v.items()) + "}"
    return str(v)


class StageRow(Horizontal):
    def __init__(self, index: int, kind: str):
        super().__init__(classes="stage-row", id=f"stage-row-{index}")
        self.index, self.kind = index, kind
        # made here, not in compose, so events arriving before the mount completes can update them
        self.bar = ProgressBar(total=1.0, show_eta=False, classes="stage-bar")
        self.label = Label("running", classes="stage-status")
        self.done = False

    def compose(self) -> ComposeResult:
        yield Label(f"[{self.index}] {self.kind}", classes="stage-name")
        yield self.bar
        yield self.label

    def progress(self, fraction: float, message: str) -> None:
        self.bar.update(progress=fraction)
        if message:
            self.label.update(message[:48])

    def finish(self, status: str, seconds: float | None = None) -> None:
        if status == "done":
            self.bar.update(progress=1.0)
        self.label.update(status if seconds is None else f"{status} in {seconds:.1f}s")
        self.add_class(status)
        self.done = True


class RunLog(RichLog):
    """The log; also receives captured prints from worker threads and libraries."""

    def on_print(self, event: events.Print) -> None:
        if event.text.strip():
            self.write(Text(event.text.rstrip("\n"), style="dim"))


class RunPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("no run yet: build a recipe (tab 2) and press ctrl+r", id="run-status")
        yield VerticalScroll(id="stage-rows")
        # min_width: RichLog renders at least 78 columns by default, wider than its region at 80
        # columns, and the scrollbar then covered the wrapped lines' last characters
        yield RunLog(id="run-log", markup=False, wrap=True, max_lines=5000, highlight=False, min_width=20)

    @property
    def log_widget(self) -> RunLog:
        return self.query_one(RunLog)

    def write(self, message: str, style: str = "") -> None:
        self.log_widget.write(Text(message, style=style))

    def reset(self, title: str) -> None:
        self.query_one("#stage-rows").remove_children()
        self.title_text = title
        self.query_one("#run-status", Static).update(title)

    def status(self, text: str) -> None:
        self.query_one("#run-status", Static).update(text)

    def show_estimate(self, estimate) -> None:
        """The run's estimated duration per stage and in all (`pipeline.estimate.RunEstimate`), before it starts."""
        for s in estimate.stages:
            self.write("  " + s.line(), "dim")
        self.write(estimate.total_line(), "bold")
        self.write("  " + estimate.probe_line(), "dim")
        about = estimate.total_line().split(" in all", 1)[0].removeprefix("estimate: ")
        self.status(f"{getattr(self, 'title_text', 'running')} ({about})")

    def _row(self, index: int) -> StageRow | None:
        rows = self.query(f"#stage-row-{index}")
        return rows.first(StageRow) if rows else None

    def handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.StageStarted):
            if self._row(e.stage) is None:
                self.query_one("#stage-rows").mount(StageRow(e.stage, e.kind))
            settings = settings_text(e.kind, e.params)
            self.write(f"[{e.stage}] {e.kind} started" + (f": {settings}" if settings else ""), "bold")
        elif isinstance(e, ev.Progress):
            row = self._row(e.stage)
            if row is not None:
                row.progress(e.fraction, e.message)
        elif isinstance(e, ev.MetricMeasured):
            if e.step is None:
                self.write(f"  [{e.stage}] {e.name} = {e.value:.4g} ({e.protocol})")
        elif isinstance(e, ev.LogLine):
            msg = e.message.rstrip()
            if e.level == "error" and "Traceback" in msg:
                self.write(msg, "red dim")
            else:
                self.write(msg, "red" if e.level == "error" else ("yellow" if e.level == "warning" else "dim"))
        elif isinstance(e, ev.StageFinished):
            row = self._row(e.stage)
            if row is not None:
                row.finish(e.status, e.seconds)
            self.write(f"[{e.stage}] {e.kind} {e.status} in {e.seconds:.1f}s", "green")
        elif isinstance(e, (ev.RunFailed, ev.RunCancelled)):
            status = "cancelled" if isinstance(e, ev.RunCancelled) else "failed"
            for row in self.query(StageRow):
                if not row.done:
                    row.finish(status)
            self.write(f"{status}: {e.message}", "bold red")
        elif isinstance(e, ev.RunFinished):
            self.status(f"run {e.status}: {e.out_dir}")
