"""The sensitivity heat map: decoder layers (rows) x options (columns), coloured by delta log-perplexity.

Renders a `pipeline.planner.sensitivity.SensitivityTable` with Rich: each cell is the delta in
nats/token (+0.012), coloured on one scale for the whole table from green (harmless) through yellow
to red (the most damaging entry); an entry that improves the calibration loss is blue, one not yet
measured is a dim dot, "none/16" (unchanged) a dim 0. Usable as a widget (`SensitivityMap`, whose
`table` may be set as the pass fills it) or as a plain renderable (`heat_table`) in a Plan pane.
"""

from __future__ import annotations

import math

from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

UNCHANGED = "none/16"
UNMEASURED = "·"
IMPROVES = "#4a7fd0"  # negative delta: the option helps on the calibration windows


def format_delta(delta: float) -> str:
    """A delta in nats per token in at most 6 characters: +0.012, +1.34, +12.3, -0.004."""
    a = abs(delta)
    if a < 1:
        return f"{delta:+.3f}"
    if a < 10:
        return f"{delta:+.2f}"
    if a < 100:
        return f"{delta:+.1f}"
    return f"{delta:+.0f}"


def heat_colour(value: float) -> str:
    """0 -> green, 0.5 -> yellow, 1 -> red (hex), readable on dark and light themes."""
    v = max(0.0, min(1.0, value))
    if v < 0.5:
        r, g = int(60 + 340 * v), 170  # green -> yellow
    else:
        r, g = 230, int(170 - 240 * (v - 0.5))  # yellow -> red
    return f"#{r:02x}{g:02x}40"


def scale_position(delta: float, top: float) -> float:
    """Where a positive delta sits on the colour scale (0..1), on a square-root scale: a table's
    deltas span three orders of magnitude (an 8-bit layer against a skipped one)."""
    if top <= 0 or delta <= 0:
        return 0.0
    return math.sqrt(min(delta, top) / top)


def cell(delta: float | None, top: float, option: str = "") -> Text:
    """One cell: its text and colour."""
    if option == UNCHANGED:
        return Text("0", style="dim")
    if delta is None:
        return Text(UNMEASURED, style="dim")
    if delta < 0:
        return Text(format_delta(delta), style=Style(color=IMPROVES))
    return Text(format_delta(delta), style=Style(color=heat_colour(scale_position(delta, top))))


def heat_table(table, *, options: list[str] | None = None, layers: list[int] | None = None) -> Table:
    """A Rich table of `table` (layers x options); `options`/`layers` choose columns and rows."""
    options = list(options or table.options)
    rows = list(range(table.layers) if layers is None else layers)
    measured = [table.delta(li, o) for li in rows for o in options if o != UNCHANGED and table.has(li, o)]
    top = max((d for d in measured if d > 0), default=0.0)
    done = sum(1 for li in range(table.layers) for o in table.options if table.has(li, o))
    title = (
        f"Δ log-ppl per layer and option ({table.method}, g{table.group_size}, {table.windows}; "
        f"baseline {table.baseline_nll:.3f} nats/token; {done}/{table.layers * len(table.options)} entries)"
    )
    grid = Table(title=title, box=None, pad_edge=False, padding=(0, 1), show_edge=False)
    grid.add_column("layer", justify="right", style="bold")
    for o in options:
        grid.add_column(o, justify="right", no_wrap=True)
    for li in rows:
        grid.add_row(str(li), *(cell(table.delta(li, o) if table.has(li, o) else None, top, o) for o in options))
    return grid


class SensitivityMap(Static):
    """The heat map as a widget; `show(table)` redraws it (call it as the pass adds entries)."""

    DEFAULT_CSS = """
    SensitivityMap { height: auto; }
    """

    def __init__(self, table=None, **kwargs):
        super().__init__("", **kwargs)
        self.show(table)

    def show(self, table) -> None:
        self.table = table
        self.update(heat_table(table) if table is not None else Text("no sensitivities measured yet", style="dim"))
