"""Memory bars: a model state's footprint by component, against a hardware target's budgets.

Footprints come from `pipeline.footprint` (storage-format accounting: N:M values plus indexes, int4
codes plus scales, ...). The live baseline is measured in a thread worker; stages come from the
session record (the runner stores `footprint` per stage). Targets and their fit verdicts come
from `pipeline.targets`.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Select, Static

from frankenlab.pipeline.footprint import footprint_summary
from frankenlab.pipeline.targets import load_targets
from frankenlab.pipeline.tensor_formats import _SHORT
from frankenlab.pipeline.units import fmt_bytes

FIT_W, DECADE_W, DECADES = 8, 4, 3  # the budget bar: 8 cells up to the budget, then 4 per factor of 10
BAR_W = FIT_W + 1 + DECADE_W * DECADES + 1  # 22: component bars as wide as the budget bars


def bar(fraction: float, width: int = BAR_W, style: str = "green") -> Text:
    """A bar filled to `fraction` of `width` (a share of the largest part; at most full)."""
    f = max(0.0, min(fraction, 1.0))
    full = min(width, int(round(f * width)))
    t = Text("█" * full, style=style)
    t.append("░" * (width - full), style="dim")
    return t


def budget_bar(factor: float) -> Text:
    """Need against a budget (factor = need / have) on a scale that tells a 5x miss from a 100x one.

    Up to the budget mark `│` the bar is linear (FIT_W cells = the whole budget); past it each
    factor of 10 is DECADE_W cells (log scale), up to 1000x; `»` marks more than that.
    5.5x: 3 red cells past the mark, 113.8x: 8, 1000x: 12."""
    f = max(0.0, factor)
    if f <= 1.0:
        full = int(round(f * FIT_W))
        t = Text("█" * full, style="green")
        t.append("░" * (FIT_W - full), style="dim")
        t.append("│", style="bold")
        t.append(" " * (DECADE_W * DECADES + 1))
        return t
    over = max(1, int(round(math.log10(f) * DECADE_W)))
    t = Text("█" * FIT_W, style="red")
    t.append("│", style="bold")
    t.append("█" * min(over, DECADE_W * DECADES), style="bold red")
    t.append("░" * max(0, DECADE_W * DECADES - over), style="dim")
    t.append("»" if over > DECADE_W * DECADES else " ", style="bold red")
    return t


# a target's checks in the pane's words: "weights" and "runtime" as in the rows above, "memory" both
CHECK_WORDS = {"weights": "weights", "kv cache + activations": "runtime", "everything": "memory"}
SCALE_NOTE = "│ budget; 4 cells ×10"  # fits the bar column (BAR_W)


def cache_label(cache: dict | None) -> str:
    """ "KV cache at 512 tokens, fp32" (batch shown when it is not 1): what the cache bytes assume."""
    if not isinstance(cache, dict) or not cache.get("context"):
        return "KV cache"
    dtype = str(cache.get("dtype") or "")
    text = f"KV cache at {cache['context']} tokens, {_SHORT.get(dtype, dtype)}"
    batch = cache.get("batch") or 1
    return text + (f", batch {batch}" if batch != 1 else "")


def list_targets() -> dict:
    """name -> Target from `pipeline.targets` (empty when the targets files cannot be read)."""
    try:
        return dict(load_targets())
    except Exception:  # noqa: BLE001 - a broken targets file must not break the lab
        return {}


class MemoryPanel(Vertical):
    """One menu entry per model state: "baseline" (the model as loaded; a session's stage 0 is the
    same thing), then "stage K name" per finished stage. Words, as in Results and `frankenlab
    compare`: "weights" = the stored weights, "memory" = weights + runtime (KV cache + activations)."""

    BASELINE = "baseline"
    MEASURING = "…"  # the menu's one entry until a footprint arrives

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.footprints: dict[str, dict] = {}
        self.live: dict | None = None  # the loaded model's own measurement (the baseline until a session has one)
        self.targets = list_targets()
        # the selector follows the latest finished stage until the user picks a state themselves
        self.picked: str | None = None
        self._auto: str | None = self.MEASURING  # the value the panel itself set last (not a user's pick)

    def compose(self) -> ComposeResult:
        with Horizontal(id="memory-controls"):
            yield Label("memory of", classes="field-label")
            yield Select(
                [("baseline (measuring…)", self.MEASURING)],  # its own value: Select relabels on a change
                value=self.MEASURING,
                allow_blank=False,
                id="memory-state",
                compact=True,
            )
            if self.targets:
                names = list(self.targets)
                default = next((n for n in names if "siracusa" in n.lower()), names[0])
                yield Label(" on ", classes="field-label")
                yield Select(
                    [(n, n) for n in names], value=default, allow_blank=False, id="memory-target", compact=True
                )
        yield Static("", id="memory-bars")

    # -- feeding ------------------------------------------------------------------------------
    def set_model(self, label: str, model) -> None:
        """Measure the loaded model (the baseline) in a thread."""
        self._measure(model)

    @work(thread=True, group="memory", exit_on_error=False)
    def _measure(self, model) -> None:
        fp = footprint_summary(model)  # holds the model's lock while it reads the model
        self.app.call_from_thread(self._add_live, fp)

    def _add_live(self, fp: dict) -> None:
        self.live = fp
        self.footprints.setdefault(self.BASELINE, fp)
        self._options()

    def set_session(self, session) -> None:
        """The session's states: its stage 0 is the baseline (one entry), then each stage with a footprint."""
        kept = {self.BASELINE: self.live} if self.live is not None else {}
        for st in session.stages:
            if st.footprint:
                kept[self.BASELINE if st.index == 0 else f"stage {st.index} {st.name or st.kind}"] = st.footprint
        self.footprints = kept
        self._options()

    def _options(self) -> None:
        if not self.footprints:
            return
        sel = self.query_one("#memory-state", Select)
        with sel.prevent(Select.Changed):  # set here, not picked by the user
            sel.set_options([(k, k) for k in self.footprints])
            if self.picked in self.footprints:
                sel.value = self.picked
            else:
                sel.value = self._auto = list(self.footprints)[-1]  # baseline first, then stages: the latest
        self.draw()

    @on(Select.Changed, "#memory-state")
    def _changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self._auto:
            self.picked = event.value  # the user chose it: later stages no longer move the selector
        self.draw()

    @on(Select.Changed, "#memory-target")
    def _target_changed(self) -> None:
        self.draw()

    def focus_selector(self) -> None:
        self.query_one("#memory-state", Select).focus()

    # -- drawing ------------------------------------------------------------------------------
    def draw(self) -> None:
        out = self.query_one("#memory-bars", Static)
        key = self.query_one("#memory-state", Select).value
        fp = self.footprints.get(key) if isinstance(key, str) else None
        if not fp:
            return
        target = name = None
        if self.targets:
            name = str(self.query_one("#memory-target", Select).value)
            target = self.targets.get(name)
        out.update(memory_table(fp, target, name, have_targets=bool(self.targets)))


def memory_table(fp: dict, target=None, name: str | None = None, *, have_targets: bool = True) -> Table:
    """One grid, three aligned columns (what, bar, numbers and words): weight components as shares
    of the largest, the totals in the pane's two words, then the target's budgets on the log bar."""
    comps = {k: v for k, v in (fp.get("components") or {}).items() if v}
    runtime = {k: comps.pop(k) for k in ("cache", "activations") if k in comps}
    table = Table.grid(padding=(0, 1))
    table.add_column(width=11, no_wrap=True)
    table.add_column(width=BAR_W, no_wrap=True)
    table.add_column()
    top = max(comps.values(), default=1)
    for part, b in sorted(comps.items(), key=lambda kv: -kv[1]):
        table.add_row(part, bar(b / top, style="cyan"), f"{fmt_bytes(b):>10}")
    table.add_row(Text("weights", style="bold"), "", _said(fp.get("weights_bytes"), "the stored weights"))
    if "cache" in runtime:
        table.add_row("runtime", "", _said(runtime["cache"], cache_label(fp.get("cache"))))
    if "activations" in runtime:
        table.add_row(
            "" if "cache" in runtime else "runtime", "", _said(runtime["activations"], "activations, one step")
        )
    table.add_row(Text("memory", style="bold"), "", _said(fp.get("total_bytes"), "weights + runtime"))
    if not have_targets:
        table.add_row("", "", Text("hardware targets: not available here", style="dim"))
        return table
    label = getattr(target, "label", "") or ""
    table.add_row(Text(f"on {name}", style="bold"), "", Text(label, style="dim"))
    if target is None:
        return table
    for check in target.verdict(fp):
        table.add_row(
            CHECK_WORDS.get(check.what, check.what),
            budget_bar(check.factor),
            Text(
                f"{check.short}: {fmt_bytes(check.need)} of {fmt_bytes(check.have)}",
                style="green" if check.fits else "bold red",
            ),
        )
    table.add_row("", Text(SCALE_NOTE, style="dim"), "")
    l1 = getattr(target, "l1", None)
    if l1:
        table.add_row("L1", "", Text(f"{fmt_bytes(l1)} scratchpad; tiles stream through it", style="dim"))
    return table


def _said(n, words: str) -> Text:
    t = Text(f"{fmt_bytes(n):>10} ")
    t.append(words, style="dim")
    return t
