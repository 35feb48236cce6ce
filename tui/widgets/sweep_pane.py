"""The Sweep pane: pick a sweep file, launch it in the background, watch nodes and the table fill.

The sweep runs in a thread worker through `sessions.sweep.run_sweep` (the local executor, in this
process); its events come back as messages. Each finished configuration adds its row (read from
its session) and redraws the Pareto front; selecting a row asks the app to open that session
(`SweepPane.OpenSession`, results and chat with its model). Stop cancels after the current batch:
finished nodes are kept and launching the same sweep again into the same folder does the rest.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Input, ProgressBar, RichLog, Static

PROGRESS_LOG_EVERY_S = 10.0  # a running node's progress line in the pane's log, at most this often
COLUMNS = ("#", "configuration", "status", "PPL", "TriviaQA closed", "size", "params (nonzero)")


def hint_text() -> str:
    """The status line before anything ran: the bundled sweep names in full (they wrap, never cut)."""
    try:
        from frankenlab.sessions.sweep import bundled_sweeps

        names = ", ".join(bundled_sweeps())
    except Exception:  # noqa: BLE001 - the list is a hint; a broken install still shows the pane
        names = ""
    bundled = f"bundled sweeps: {names}. " if names else ""
    return f"{bundled}Type a name or a sweep file, Check lists its configurations, Launch runs it."


class SweepPane(Vertical):
    class OpenSession(Message):
        def __init__(self, path: Path):
            super().__init__()
            self.path = path

    class Event(Message):
        """One sweep event (sessions.sweep.events), carried from the worker thread."""

        def __init__(self, event):
            super().__init__()
            self.event = event

    def __init__(self, runs_dir: str | Path = "runs", data_dir: str | Path | None = None, *, id: str | None = None):
        super().__init__(id=id)
        self.runs_dir, self.data_dir = Path(runs_dir), data_dir
        self.cancel = threading.Event()
        self.running = False
        self.out: Path | None = None
        self.rows: dict[int, Path] = {}  # configuration index -> its session file
        self.done_nodes = self.todo = 0
        self.labels: dict[str, str] = {}  # running node key -> label
        self.throttle = None  # sessions.sweep.events.Throttle, made at the sweep's start

    def compose(self) -> ComposeResult:
        with Horizontal(id="sweep-controls"):
            yield Input(placeholder="sweep file or bundled name", id="sweep-file")
            yield Input(placeholder="output folder (default runs/sweep-NAME)", id="sweep-out")
            yield Button("Check", id="sweep-check")
            yield Button("Launch", id="sweep-launch", variant="primary")
            yield Button("Stop", id="sweep-stop", disabled=True)
        yield Static(hint_text(), id="sweep-status", classes="hint")
        yield ProgressBar(total=1.0, show_eta=False, id="sweep-progress")
        yield DataTable(id="sweep-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="sweep-bottom"):
            yield RichLog(id="sweep-log", max_lines=500, wrap=False, markup=False)
            yield Static("", id="sweep-pareto")

    def on_mount(self) -> None:
        self.query_one("#sweep-table", DataTable).add_columns(*COLUMNS)

    # -- controls ---------------------------------------------------------------------------------
    def _load(self):
        from frankenlab.sessions.sweep import SweepError, load_sweep

        name = self.query_one("#sweep-file", Input).value.strip()
        if not name:
            self.app.notify("give a sweep file or a bundled sweep name first", severity="warning")
            return None
        try:
            sweep = load_sweep(name)
            return sweep, sweep.expand()
        except SweepError as exc:
            self.app.notify(str(exc), title="sweep refused", severity="error", timeout=12)
            return None

    @on(Button.Pressed, "#sweep-check")
    def check(self) -> None:
        loaded = self._load()
        if loaded:
            from frankenlab.sessions.sweep import build_tree

            sweep, configs = loaded
            nodes, _ = build_tree(configs)
            shared = sum(1 for n in nodes.values() if n.index > 0 and len(n.configs) > 1)
            self._status(
                f"{sweep.name}: {len(configs)} configuration(s), {len(nodes)} node(s), {shared} shared "
                "prefix(es); the configurations are listed below"
            )
            log = self.query_one("#sweep-log", RichLog)
            log.write(f"{sweep.name}: {len(configs)} configuration(s)")
            for c in configs:
                log.write(f"  {c.index:>3}  {c.label}")

    @on(Button.Pressed, "#sweep-launch")
    def launch(self) -> None:
        if self.running:
            self.app.notify("a sweep is already running (Stop it first)", severity="warning")
            return
        loaded = self._load()
        if not loaded:
            return
        sweep, configs = loaded
        typed = self.query_one("#sweep-out", Input).value.strip()
        out = Path(typed) if typed else self.runs_dir / f"sweep-{sweep.name}"
        from frankenlab.tui.screens.confirm import ConfirmScreen

        question = (
            f"Launch the sweep {sweep.name}: {len(configs)} configuration(s) into {out}? It runs in the "
            "background; Stop keeps what finished, and launching again into that folder does the rest."
        )
        self.app.push_screen(
            ConfirmScreen(question, yes="Launch", no="Not now"),
            lambda yes: yes and self._start(sweep, configs, out),
        )

    def _start(self, sweep, configs, out: Path) -> None:
        if self.running:
            return
        self.out = out
        self.rows.clear()
        self.query_one("#sweep-table", DataTable).clear()
        self.cancel = threading.Event()
        self.running = True
        self._buttons()
        self._status(f"{sweep.name}: starting into {self.out}")
        self.run_worker_thread(sweep, configs, self.out)

    @on(Button.Pressed, "#sweep-stop")
    def stop(self) -> None:
        if self.running:
            self.cancel.set()
            self._status("stopping after the current batch; finished nodes are kept")

    @work(thread=True, exclusive=True, group="sweep")
    def run_worker_thread(self, sweep, configs, out: Path) -> None:
        from frankenlab.sessions.sweep import run_sweep

        try:
            run_sweep(
                sweep,
                out,
                listener=lambda e: self.post_message(self.Event(e)),
                cancel=self.cancel,
                data_dir=self.data_dir,
                configs=configs,
            )
        except Exception as exc:  # noqa: BLE001 - shown to the user, never a traceback on screen
            self.app.call_from_thread(
                self.app.notify, f"{type(exc).__name__}: {exc}", title="sweep failed", severity="error"
            )
            self.post_message(self.Event(None))

    # -- events -----------------------------------------------------------------------------------
    @on(Event)
    def _event(self, message: Event) -> None:
        from frankenlab.sessions import sweep as sw

        e, log = message.event, self.query_one("#sweep-log", RichLog)
        bar = self.query_one("#sweep-progress", ProgressBar)
        stamp = time.strftime("%H:%M:%S")
        if e is None:
            self._finished()
        elif isinstance(e, sw.SweepStarted):
            self.done_nodes, self.todo = 0, e.todo
            if e.message:  # e.g. a dead sweep's lock taken over
                log.write(f"{stamp} {e.message}")
            log.write(f"{stamp} {e.name}: {len(e.configs)} configurations, {e.nodes} nodes, {e.todo} to compute")
            self._status(f"{e.name}: 0 of {e.todo} node(s) computed")
        elif isinstance(e, sw.NodeStarted):
            self.labels[e.key] = e.label
            log.write(f"{stamp} start  {e.label}")
            bar.update(progress=0.0)
            self._status(f"{self.done_nodes} of {self.todo} node(s) computed; running {e.label}")
        elif isinstance(e, sw.NodeProgress):
            from frankenlab.sessions.sweep.events import Throttle, progress_text

            bar.update(progress=e.fraction)
            label = self.labels.get(e.key, e.key)
            self._status(f"{self.done_nodes} of {self.todo} node(s) computed; {label}: {progress_text(e)}")
            self.throttle = self.throttle or Throttle(PROGRESS_LOG_EVERY_S)
            if self.throttle.due(e.key, e.message, e.fraction):
                log.write(f"{stamp}   ...  {label}: {progress_text(e)}")
        elif isinstance(e, sw.NodeFinished):
            self.done_nodes += e.status == "done"
            secs = f" ({e.seconds:.1f}s)" if e.seconds else ""
            log.write(f"{stamp} {e.status:<6} {e.label}{secs}{': ' + e.message if e.message else ''}")
            self._status(f"{self.done_nodes} of {self.todo} node(s) computed")
        elif isinstance(e, sw.ConfigFinished):
            self._add_row(e)
        elif isinstance(e, sw.SweepFinished):
            log.write(f"{stamp} sweep {e.status}: {e.record}")
            self._finished(e.status)

    def _add_row(self, e) -> None:
        from frankenlab.sessions import SessionError, headline, load_session
        from frankenlab.sessions.compare import format_value

        table = self.query_one("#sweep-table", DataTable)
        try:
            h = headline(load_session(e.session))
        except SessionError as exc:
            self.query_one("#sweep-log", RichLog).write(f"config {e.index}: {exc}")
            return
        key = str(e.index)
        cells = (
            key,
            e.label,
            e.status,
            format_value(h["perplexity"], "float"),
            format_value(h["triviaqa_closed"], "pct"),
            format_value(h["size"], "bytes"),
            format_value(h["params_nonzero"], "int"),
        )
        if key in table.rows:
            table.remove_row(key)
        table.add_row(*(Text(c) for c in cells), key=key)
        self.rows[e.index] = Path(e.session)
        self._pareto()

    def _pareto(self) -> None:
        from frankenlab.sessions import SessionError, load_session
        from frankenlab.sessions.sweep.results import budget_bytes, pareto_points, pareto_text

        try:
            sessions = []
            for i, p in sorted(self.rows.items()):
                s = load_session(p)
                s.name = str(i)  # the table's "#": short labels on the plot
                sessions.append(s)
        except SessionError:
            return
        points, title, _ = pareto_points(sessions)
        text = pareto_text(points, title, budget_bytes(), width=40, height=10)
        figure = self.out / "tables" / "pareto.png" if self.out is not None else None
        if figure is not None and figure.is_file():  # written when the sweep ends
            text += f"figure: {figure} (and pareto.svg)\n"
        self.query_one("#sweep-pareto", Static).update(Text(text))

    def _finished(self, status: str = "failed") -> None:
        self.running = False
        self._buttons()
        if self.out is not None and status in ("done", "cancelled", "failed"):
            # drawing the figure takes seconds of CPU (matplotlib): off the event loop
            self._status(f"sweep ended ({status}); writing the tables and the Pareto figure into {self.out / 'tables'}")
            self.write_results_thread(self.out, status)
        else:
            self._written(status)

    @work(thread=True, group="sweep-results")
    def write_results_thread(self, out: Path, status: str) -> None:
        try:
            from frankenlab.sessions.sweep.results import write_results

            write_results(out)
        except Exception:  # noqa: BLE001 - no finished configuration yet
            pass
        self.app.call_from_thread(self._written, status)

    def _written(self, status: str) -> None:
        if self.rows:
            self._pareto()  # now with the figure's path
        self._status(f"sweep {status}: {len(self.rows)} configuration(s) in {self.out}; select a row to open it")

    @on(DataTable.RowSelected, "#sweep-table")
    def _selected(self, event: DataTable.RowSelected) -> None:
        path = self.rows.get(int(event.row_key.value))
        if path is not None:
            self.post_message(self.OpenSession(path))

    def _buttons(self) -> None:
        self.query_one("#sweep-launch", Button).disabled = self.running
        self.query_one("#sweep-stop", Button).disabled = not self.running

    def _status(self, text: str) -> None:
        self.query_one("#sweep-status", Static).update(Text(text))
