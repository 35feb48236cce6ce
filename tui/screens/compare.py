"""Several sessions side by side: every stage's perplexity, TriviaQA, parameters, footprint, time."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from frankenlab.sessions.compare import compare_table, format_value

FIRST = ("session", "stage", "status", "configuration")


def screen_order(columns: list) -> list:
    """The same columns as `frankenlab compare`, the ones a reader looks at first on the left: which
    session and stage, then perplexity with its protocol (seen at 120 columns), the rest, the id last."""
    first = [c for key in FIRST for c in columns if c.key == key]
    ppl = [c for c in columns if c.key.startswith("perplexity")]
    last = [c for c in columns if c.key == "id"]
    rest = [c for c in columns if c not in first and c not in ppl and c not in last]
    return first + ppl + rest + last


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
        columns = screen_order(table.columns)
        # Text, not markup: "PPL [wikitext2-concat-512:first2]" kept its protocol only as plain text
        t.add_columns(*[Text(c.title) for c in columns])
        for r in table.rows:
            t.add_row(*[Text(format_value(r.get(c.key), c.kind)) for c in columns])
        if table.notes:
            self.query_one("#compare-notes", Label).update("\n".join(table.notes))
