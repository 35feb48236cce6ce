"""Several sessions side by side: every stage's perplexity, TriviaQA, parameters, footprint, time."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from tui.widgets.results import fmt_bytes, fmt_params, footprint_total


def compare_rows(sessions: list) -> list[tuple]:
    rows = []
    for s in sessions:
        name = (s.recipe or {}).get("name", "?")
        for st in s.stages:
            ppl = st.metric("perplexity")
            tc, to = st.metric("triviaqa_closed"), st.metric("triviaqa_open")
            rows.append((f"{name} ({s.id[:6]})", f"{st.index} {st.name or st.kind}", st.status,
                         f"{ppl['value']:.2f} ({ppl.get('protocol', '')})" if ppl else "-",
                         f"{tc['value']:.1%}" if tc else "-", f"{to['value']:.1%}" if to else "-",
                         fmt_params(st.params_count), fmt_bytes(footprint_total(st.footprint)),
                         f"{st.seconds:.1f}" if st.seconds else "-"))
    return rows


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
        t = self.query_one(DataTable)
        try:  # the sessions backend's table: the same columns as `frankenlab sessions compare`
            from sessions.compare import compare_table, format_value
        except ImportError:
            compare_table = None
        if compare_table is not None:
            table = compare_table(self.sessions, all_stages=True)
            t.add_columns(*[c.title for c in table.columns])
            for r in table.rows:
                t.add_row(*[format_value(r.get(c.key), c.kind) for c in table.columns])
            for note in table.notes:
                self.query_one("#compare-notes", Label).update("\n".join(table.notes))
            return
        t.add_columns("session", "stage", "status", "perplexity (protocol)", "TQA closed", "TQA open", "params",
                      "footprint", "s")
        for r in compare_rows(self.sessions):
            t.add_row(*r)
