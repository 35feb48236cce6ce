"""Live results: the stage table, perplexity per stage and the LoRA loss curve.

A LoRA stage's validation curve also gets one line under the table (`#lora-curve`, hidden while
there is none): `val loss ▇▆▅▄▃▃▃ 3.41 -> 3.02 (stopped at 96/512: plateau)`, from the
`lora_val_loss` events during a run and from the stage report (`val_curve`, `stop`) after it.

Rows are fed from runner events during a run (`handle`) and from a session record when one is
opened or a run ends (`show_session`). Every perplexity is printed with its protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from frankenlab.pipeline import events as ev
from frankenlab.pipeline.units import fmt_bytes


def fmt_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


@dataclass
class Row:
    index: int
    kind: str
    status: str = "pending"
    metrics: dict = field(default_factory=dict)  # name -> (value, protocol)
    params: int | None = None
    nonzero: int | None = None
    layers: int | None = None
    footprint: float | None = None
    seconds: float | None = None


def _curve_text(report: dict) -> str:
    from frankenlab.pipeline.lora_progress import curve_text  # imports torch: only once a curve is there

    return curve_text(report)


def footprint_total(fp: dict | None) -> float | None:
    if not fp:
        return None
    for key in ("total_bytes", "total", "bytes"):
        v = fp.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


class ResultsPanel(Vertical):
    BINDINGS = [Binding("m", "app.focus_memory", "Memory")]  # the memory-bar selector, by keyboard

    COLUMNS = (
        "#",
        "stage",
        "status",
        "perplexity (protocol)",
        "TQA closed",
        "TQA open",
        "params",
        "nonzero",
        "layers",
        "memory",  # weights + runtime (KV cache + activations), as in the memory pane and `frankenlab compare`
        "s",
    )

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.rows: dict[int, Row] = {}
        self.loss: list[tuple[int, float]] = []
        self.val: dict[int, list[tuple[int, float]]] = {}  # stage -> LoRA validation curve, live
        self.curves: dict[int, str] = {}  # stage -> the curve's line, from its report once it finished

    def compose(self) -> ComposeResult:
        yield DataTable(id="results-table", zebra_stripes=True, cursor_type="row")
        curve = Static("", id="lora-curve", markup=False)
        curve.display = False
        yield curve
        with Horizontal(id="plots"):
            yield PlotextPlot(id="ppl-plot")
            yield PlotextPlot(id="loss-plot")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns(*self.COLUMNS)
        self.redraw()

    # -- feeding ------------------------------------------------------------------------------
    def clear(self) -> None:
        self.rows, self.loss, self.val, self.curves = {}, [], {}, {}
        self.redraw()

    def handle(self, e: ev.Event) -> None:
        if e.stage < 0:
            return
        row = self.rows.setdefault(e.stage, Row(e.stage, getattr(e, "kind", "?")))
        if isinstance(e, ev.StageStarted):
            row.kind, row.status = e.kind, "running"
        elif isinstance(e, ev.MetricMeasured):
            if e.name == "lora_loss" and e.step is not None:
                self.loss.append((e.step, e.value))
                self._plot_loss()
                return
            if e.name == "lora_val_loss" and e.step is not None:
                self.val.setdefault(e.stage, []).append((e.step, e.value))
                self._plot_loss()
                self._draw_curves()
                return
            if e.step is None:
                row.metrics[e.name] = (e.value, e.protocol)
        elif isinstance(e, ev.StageFinished):
            rec = e.record
            row.status, row.seconds = rec.status, rec.seconds
            row.params = rec.params_count or row.params
            row.nonzero = rec.params_nonzero or row.nonzero
            row.layers = rec.num_layers or row.layers
            row.footprint = footprint_total(rec.footprint) if isinstance(rec.footprint, dict) else row.footprint
            self._curve_from(rec.index, rec.report)
        elif isinstance(e, (ev.RunFailed, ev.RunCancelled)):
            for r in self.rows.values():
                if r.status in ("running", "pending"):
                    r.status = "cancelled" if isinstance(e, ev.RunCancelled) else "failed"
        else:
            return
        self.redraw()

    def show_session(self, session) -> None:
        """Fill from a session record (keeps the loss curve collected live, or rebuilds it from events)."""
        self.rows, self.val, self.curves = {}, {}, {}
        for st in session.stages:
            r = Row(
                st.index,
                st.name or st.kind,
                st.status,
                params=st.params_count,
                nonzero=st.params_nonzero,
                layers=st.num_layers,
                footprint=footprint_total(st.footprint),
                seconds=st.seconds,
            )
            for m in st.metrics:
                r.metrics[m["name"]] = (m["value"], m.get("protocol", ""))
            self.rows[st.index] = r
            self._curve_from(st.index, st.report)
        loss = [
            (e["step"], e["value"])
            for e in session.events
            if e.get("event") == "MetricMeasured" and e.get("name") == "lora_loss" and e.get("step") is not None
        ]
        if loss:
            self.loss = loss
        val: dict[int, list] = {}  # a stage that did not finish has no report: its curve is in the events
        for e in session.events:
            if e.get("event") == "MetricMeasured" and e.get("name") == "lora_val_loss" and e.get("step") is not None:
                val.setdefault(e.get("stage", -1), []).append((e["step"], e["value"]))
        for i, pts in val.items():
            self.val.setdefault(i, pts)
        self.redraw()

    def _curve_from(self, index: int, report: dict | None) -> None:
        """A finished stage's validation curve (LoRA's report: `val_curve`, `stop`), as the live one."""
        if isinstance(report, dict) and report.get("val_curve"):
            self.val[index] = [(int(s), float(v)) for s, v in report["val_curve"]]
            self.curves[index] = _curve_text(report)

    # -- drawing ------------------------------------------------------------------------------
    def redraw(self) -> None:
        if not self.is_mounted:
            return
        table = self.query_one(DataTable)
        table.clear()
        for i in sorted(self.rows):
            r = self.rows[i]
            ppl = r.metrics.get("perplexity")
            tc, to = r.metrics.get("triviaqa_closed"), r.metrics.get("triviaqa_open")
            table.add_row(
                str(i),
                r.kind,
                r.status,
                f"{ppl[0]:.2f} ({ppl[1]})" if ppl else "-",
                f"{tc[0]:.1%}" if tc else "-",
                f"{to[0]:.1%}" if to else "-",
                fmt_params(r.params),
                fmt_params(r.nonzero),
                str(r.layers or "-"),
                fmt_bytes(r.footprint),
                f"{r.seconds:.1f}" if r.seconds is not None else "-",
                key=str(i),
            )
        self._plot_ppl()
        self._plot_loss()
        self._draw_curves()

    def curve_lines(self) -> list[str]:
        """One line per stage with a validation curve: its report's when finished, else the live one."""
        out = []
        for i in sorted(self.val):
            text = self.curves.get(i) or _curve_text({"val_curve": self.val[i]})
            if text:
                kind = self.rows[i].kind if i in self.rows else "lora"
                out.append(f"stage {i} {kind}: {text}")
        return out

    def _draw_curves(self) -> None:
        if not self.is_mounted:
            return
        lines = self.curve_lines()
        widget = self.query_one("#lora-curve", Static)
        widget.update("\n".join(lines))
        widget.display = bool(lines)

    def _redraw(self, selector: str, draw) -> None:
        """Clear the plot at `selector` (if mounted), let `draw(plt)` fill it, then repaint."""
        plots = self.query(selector)
        if not plots:
            return
        w = plots.first()
        w.plt.clear_data()
        w.plt.clear_figure()
        draw(w.plt)
        w.refresh()

    def _plot_ppl(self) -> None:
        def draw(plt):
            pts = [
                (str(i), r.metrics["perplexity"][0]) for i, r in sorted(self.rows.items()) if "perplexity" in r.metrics
            ]
            protos = {r.metrics["perplexity"][1] for r in self.rows.values() if "perplexity" in r.metrics}
            plt.title("ppl " + (", ".join(sorted(protos)) if protos else "per stage"))
            if pts:
                plt.bar([p[0] for p in pts], [p[1] for p in pts])

        self._redraw("#ppl-plot", draw)

    def _plot_loss(self) -> None:
        def draw(plt):
            plt.title("LoRA loss" if self.loss else "LoRA loss (no LoRA stage yet)")
            if self.loss:
                plt.plot([s for s, _ in self.loss], [v for _, v in self.loss], label="train" if self.val else None)
            for i, pts in sorted(self.val.items()):  # the held-out validation loss, same axes
                plt.plot([s for s, _ in pts], [v for _, v in pts], label="val" if len(self.val) == 1 else f"val {i}")

        self._redraw("#loss-plot", draw)
