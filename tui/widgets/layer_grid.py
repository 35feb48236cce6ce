"""The layer grid: every decoder layer as a cell; keep, skip or repeat it, Franken-LLaMA style.

The grid holds per-layer run counts (0 = skip, 1 = keep, 2+ = repeat) and posts `PlanChanged`
with the resulting `LayerPlan` whenever they change. It is drawn as one widget (one line of text
per grid row) so 30 or 100 layers cost the same; clicks are mapped back to cells by offset.
Importance scores, when known, colour each cell from green (cheap to remove) to red (important).
A cell shows its own effect: the perplexity delta against the unmodified model of that layer's
change alone (every other layer kept once), for the state the cell is in: a skipped cell (and a
kept one, once the importance scan has measured it) what skipping it alone costs, a repeated cell
what that repeat alone costs. Never the delta of the whole plan (that is on the what-if line).
"""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from frankenlab.pipeline.plans import LayerPlan

CELL_W = 14  # " 14 ✗ +3.31  ": index, mark, the layer's own delta
MAX_REPEAT = 9


def format_delta(delta: float) -> str:
    """A perplexity delta in at most 6 characters: +3.31, -0.42, +52.9, +607, +63k."""
    a = abs(delta)
    if a < 10:
        return f"{delta:+.2f}"
    if a < 100:
        return f"{delta:+.1f}"
    if a < 10_000:
        return f"{delta:+.0f}"
    if a < 1e6:
        return f"{delta / 1000:+.0f}k"
    return "+>1M" if delta > 0 else "-<1M"


def heat(value: float) -> str:
    """0 -> green (removable), 1 -> red (important), as a hex colour readable in dark and light themes."""
    v = max(0.0, min(1.0, value))
    r, g = (int(60 + 160 * v), int(170 - 110 * v))
    return f"#{r:02x}{g:02x}40"


class LayerGrid(Widget, can_focus=True):
    """Arrow keys move, space cycles keep/skip, + and - set repeats, 0 resets, mouse clicks cycle."""

    BINDINGS = [
        Binding("left", "move(-1, 0)", "Left", show=False),
        Binding("right", "move(1, 0)", "Right", show=False),
        Binding("up", "move(0, -1)", "Up", show=False),
        Binding("down", "move(0, 1)", "Down", show=False),
        Binding("space,enter", "toggle", "Skip"),  # short: the footer must fit 80 columns (legend says more)
        Binding("plus,equals_sign", "repeat(1)", "Repeat"),
        Binding("minus", "repeat(-1)", "Repeat -", show=False),
        Binding("0", "reset", "Reset", show=False),  # in the legend under the grid
        Binding("u", "app.use_plan", "To recipe"),
        Binding("e", "app.estimate", "Estimate", show=False),
        Binding("i", "app.scan", "Scan"),
    ]

    cursor = reactive(0)

    class PlanChanged(Message):
        def __init__(self, grid: LayerGrid, plan: LayerPlan | None, cell: int | None = None):
            super().__init__()
            self.grid = grid
            self.plan = plan  # None when every layer would be skipped
            self.cell = cell  # the cell whose change made this plan (None: reset, loaded plan, new model)

        @property
        def control(self) -> LayerGrid:
            return self.grid

    def __init__(self, n_layers: int = 0, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.counts: list[int] = [1] * n_layers
        self.protected: set[int] = set()
        self.scores: dict[int, float] = {}
        # (cell, run count) -> ppl delta of that change alone: (i, 0) skipped, (i, n) run n times
        self.tried: dict[tuple[int, int], float] = {}

    # -- attributes down ----------------------------------------------------------------------
    def set_layers(self, n: int, protected: set[int] | None = None) -> None:
        self.counts = [1] * n
        self.protected = protected or set()
        self.scores = {}
        self.tried = {}
        self.cursor = 0
        self.refresh(layout=True)
        self._changed()

    def set_protected(self, protected: set[int]) -> None:
        self.protected = protected
        self.refresh()

    def set_scores(self, scores: dict[int, float]) -> None:
        """Importance per layer (higher = more important); shown as a heat colour."""
        self.scores = dict(scores)
        self.refresh()

    def set_tried(self, deltas: dict[tuple[int, int], float]) -> None:
        """One layer's own effects, (cell, run count) -> ppl delta of that change alone, shown beside the cell."""
        self.tried.update({(i, c): d for (i, c), d in deltas.items() if 0 <= i < len(self.counts)})
        self.refresh()

    def own_delta(self, i: int) -> float | None:
        """The delta the cell shows: its current change alone (a kept cell: skipping it alone), if measured."""
        c = self.counts[i]
        return self.tried.get((i, 0 if c == 1 else c))

    def set_plan(self, plan: LayerPlan) -> None:
        self.counts = plan.counts()
        self.refresh()
        self._changed()

    @property
    def plan(self) -> LayerPlan | None:
        if not self.counts or not any(self.counts):
            return None
        return LayerPlan.from_counts(self.counts)

    # -- actions ------------------------------------------------------------------------------
    def _cols(self) -> int:
        return max(1, self.size.width // CELL_W) if self.size.width else 10

    def action_move(self, dx: int, dy: int) -> None:
        if not self.counts:
            return
        self.cursor = max(0, min(len(self.counts) - 1, self.cursor + dx + dy * self._cols()))

    def action_toggle(self) -> None:
        if self.counts:
            self.toggle(self.cursor)

    def toggle(self, i: int) -> None:
        self.counts[i] = 0 if self.counts[i] else 1
        self.refresh()
        self._changed(i)

    def action_repeat(self, delta: int) -> None:
        if not self.counts:
            return
        i = self.cursor
        self.counts[i] = max(0, min(MAX_REPEAT, self.counts[i] + delta))
        self.refresh()
        self._changed(i)

    def action_reset(self) -> None:
        self.counts = [1] * len(self.counts)
        self.refresh()
        self._changed()

    def _changed(self, cell: int | None = None) -> None:
        self.post_message(self.PlanChanged(self, self.plan, cell))

    def watch_cursor(self) -> None:
        self.refresh()

    # -- mouse --------------------------------------------------------------------------------
    def on_click(self, event) -> None:
        col, row = event.x // CELL_W, event.y
        i = row * self._cols() + col
        if 0 <= col < self._cols() and 0 <= i < len(self.counts):
            self.cursor = i
            self.toggle(i)

    # -- drawing ------------------------------------------------------------------------------
    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        cols = max(1, width // CELL_W)
        return max(1, math.ceil(len(self.counts) / cols))

    def _cell(self, i: int) -> Text:
        c = self.counts[i]
        mark = "✓ " if c == 1 else ("✗ " if c == 0 else f"×{c}")
        own = self.own_delta(i)
        label = f"{i:>3} {mark}{'' if own is None else format_delta(own):>6}  "  # CELL_W wide
        style = Style()
        if self.scores and i in self.scores:
            # by rank, not value: one very important layer would otherwise paint every other one green
            ranked = sorted(self.scores, key=self.scores.get)
            style += Style(color="#ffffff", bgcolor=heat(ranked.index(i) / max(1, len(ranked) - 1)))
        if c == 0:
            style += Style(dim=True, strike=True)
        elif c > 1:
            style += Style(bold=True)
        if i in self.protected:
            style += Style(underline=True)
        if i == self.cursor and self.has_focus:
            style += Style(reverse=True)
        elif i == self.cursor:
            style += Style(italic=True)
        return Text(label, style=style)

    def render(self) -> Text:
        if not self.counts:
            return Text("no model loaded", style="dim")
        cols = self._cols()
        out = Text()
        for start in range(0, len(self.counts), cols):
            if start:
                out.append("\n")
            for i in range(start, min(start + cols, len(self.counts))):
                out.append_text(self._cell(i))
        return out

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()
