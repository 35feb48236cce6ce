"""Several sessions side by side: every stage's perplexity, TriviaQA, parameters, footprint, time."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from frankenlab.sessions.compare import compare_table, format_value


class CompareScreen(ModalScreen):
    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, sessions: list):
        super().__init__()
        self.sessions = sessions

    def compose(self) -> ComposeResult:
        with Vertical(id="compare-box"):
            yield Label(f"comparing {len(self.sessions)} session(s) (esc closes)")
            yield DataTable(id="compare-table", zebra_stripes=True)
            yield Label("", id="compare-notes", classes="hint")

    def on_mount(self) -> None:
        """The sessions backend's table: the same columns as `frankenlab sessions compare`."""
        t = self.query_one(DataTable)
        table = compare_table(self.sessions, all_stages=True)
        t.add_columns(*[c.title for c in table.columns])
        for r in table.rows:
            t.add_row(*[format_value(r.get(c.key), c.kind) for c in table.columns])
        if table.notes:
            self.query_one("#compare-notes", Label).update("\n".join(table.notes))
