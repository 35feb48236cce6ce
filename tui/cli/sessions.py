"""`frankenlab replay`, `frankenlab compare`, `frankenlab sessions`: saved sessions, headless.

replay SESSION [--from-stage K] [--tolerance T]   re-run a session's recipe, print new vs saved
compare [S1 S2 ...] [--format md|csv|json]         one table of many sessions (thesis-style)
sessions [DIR ...]                                 list saved sessions with their headline numbers
sessions --save SESSION [--name N]                 copy a session into the user's session folder
A SESSION is a session.json file or the run folder holding one. With no paths, compare and
sessions look in ./runs and the user's session folder ($FRANKENLAB_SESSIONS, else
$XDG_DATA_HOME/frankenlab/sessions, else ~/.local/share/frankenlab/sessions).
Exit codes: 0 fine, 1 a replay number out of tolerance (or the replay did not finish), 2 unusable input.

This module registers all three subcommands (keeping their order in --help) and holds the
listing/saving job; the replay job lives in `tui/cli/replay.py`, the comparison table in `tui/cli/compare.py`.
"""

from __future__ import annotations

import json
import sys
import time

from rich import box
from rich.markup import escape
from rich.table import Table

from frankenlab.sessions.printable import printable
from frankenlab.tui.cli import options
from frankenlab.tui.cli.compare import compare_main
from frankenlab.tui.cli.console import make_console, piped
from frankenlab.tui.cli.replay import replay_main


def register(sub) -> None:
    r = sub.add_parser(
        "replay",
        help="re-run a saved session's recipe and compare every metric with the saved one",
        description="Re-run the recipe of a saved session into a new run folder and print each "
        "metric beside the saved value, flagging differences beyond the tolerance.",
    )
    r.add_argument("session", help="session.json file or the run folder holding it")
    r.add_argument(
        "--from-stage",
        type=int,
        default=1,
        metavar="K",
        help="resume at stage K from the model the session saved after stage K-1 (default 1: all)",
    )
    r.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="REL",
        help="relative tolerance before a difference is flagged (default 0.01 = 1 %%)",
    )
    options.add(
        r,
        "out",
        "model",
        "device",
        "dtype",
        "data_dir",
        "no_save_models",
        notes={
            "out": "default: runs/<recipe>-replay-<time>",
            "model": "default: the session's; give one for e.g. the same model at another path",
            "device": "default, or auto: the session's",
            "dtype": "default, or auto: the session's",
        },
    )
    r.set_defaults(func=replay_main)

    c = sub.add_parser(
        "compare",
        help="compare saved sessions as one table (md, csv, json)",
        description="Print one row per session (configuration, LoRA, quantization, TriviaQA "
        "closed/open, perplexity per protocol, params, size). With no paths: every "
        "session in ./runs and the user's session folder.",
    )
    c.add_argument(
        "sessions",
        nargs="*",
        help="session files or folders (searched for session.json); a sweep "
        "folder gives the thesis' tables (md, csv, json, LaTeX) and a Pareto plot",
    )
    options.add(
        c,
        "fmt",
        notes={"fmt": "default: a table on a terminal, md when piped"},
        fmt={"choices": ("table", "md", "csv", "json")},
    )
    c.add_argument("--all-stages", action="store_true", help="one row per finished stage, not only the final model")
    c.add_argument("--output", "-o", default=None, help="write to this file instead of the terminal")
    c.set_defaults(func=compare_main)

    s = sub.add_parser(
        "sessions",
        help="list saved sessions with their headline numbers",
        description="List sessions in ./runs and the user's session folder (or the given folders), "
        "newest first; unreadable files are listed with the reason.",
    )
    s.add_argument("dirs", nargs="*", help="folders or files to look in")
    options.add(
        s,
        "fmt",
        notes={"fmt": "default: a table on a terminal, tab-separated text when piped"},
        fmt={"choices": ("table", "json")},
    )
    s.add_argument("--schema", action="store_true", help="print the session file's JSON Schema and exit")
    s.add_argument(
        "--save",
        metavar="SESSION",
        default=None,
        help="copy this session (file or run folder) into the user's session folder and exit",
    )
    s.add_argument("--name", default=None, help="with --save: the label to save it under")
    s.set_defaults(func=sessions_main)


# -- sessions --------------------------------------------------------------------------------------
def sessions_table(columns, rows, width: int, looked: str) -> Table:
    """The columns that fit: the path (under 170 columns), the params (140), the stage count and the
    time of day (100) go (the json format and a pipe keep them all), and perplexity protocols move
    to the caption, so names and numbers are not folded into 6-character strips."""
    keep = list(range(len(columns)))
    if width < 170:
        keep.remove(columns.index("path"))
    if width < 140:
        keep.remove(columns.index("params (nonzero)"))
    if width < 100:
        keep.remove(columns.index("stages"))
        if all(r[columns.index("TriviaQA c/o")] == "- / -" for r in rows):
            keep.remove(columns.index("TriviaQA c/o"))  # nothing measured: room for the name
    t = Table(
        title=f"sessions in {escape(looked)}", box=box.SIMPLE_HEAD if width < 140 else box.HEAVY_HEAD, pad_edge=False
    )
    for i in keep:
        col = columns[i]
        t.add_column(
            col if width >= 100 or col != "TriviaQA c/o" else "TQA c/o",
            justify="right" if col in ("perplexity", "params (nonzero)") else "left",
            overflow="fold",
            no_wrap=col not in ("name", "configuration", "path", "TriviaQA c/o"),
            min_width={"name": 12, "configuration": 14, "path": 20, "TriviaQA c/o": 6}.get(col),
            ratio={"name": 2, "configuration": 3, "path": 3}.get(col),
        )
    protocols = set()
    for r in rows:
        cells = [escape(r[i]) for i in keep]
        if True:  # the protocol goes to the caption (one line for all rows), the number stays
            p = keep.index(columns.index("perplexity"))
            value, _, proto = r[columns.index("perplexity")].partition(" (")
            cells[p] = escape(value)
            if proto:
                protocols.add(proto.rstrip(")"))
        if width < 100:
            cells[0] = cells[0][:10]  # the date; the time of day is in the json format
            n = keep.index(columns.index("name"))
            cells[n] = cells[n].replace(" (", "\n(")  # the id under the name
        t.add_row(*cells)
    if protocols:
        t.caption = escape("perplexity: " + ", ".join(sorted(protocols)))
    return t


def sessions_main(args) -> int:
    from frankenlab.sessions import default_session_dirs, headline, list_sessions

    if args.schema:
        from frankenlab.sessions.schema import SESSION_SCHEMA

        sys.stdout.write(json.dumps(SESSION_SCHEMA, indent=2) + "\n")
        return 0
    console = make_console()
    if args.save:
        from frankenlab.sessions import SessionError, load_session, save_to_user_dir

        try:
            path = save_to_user_dir(load_session(args.save), args.name)
        except SessionError as exc:
            console.print(f"[bold red]cannot save:[/bold red] {escape(str(exc))}")
            return 2
        console.print(f"saved to [bold]{escape(str(path))}[/bold]", soft_wrap=True)
        return 0
    dirs = args.dirs or None
    entries = list_sessions(dirs)
    if args.fmt == "json":
        out = []
        for e in entries:
            item = {"path": str(e.path), "error": e.error}
            if e.session is not None:
                s = e.session
                item.update({"id": s.id, "name": s.title, "status": s.status, "created": s.created, **headline(s)})
            out.append(item)
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return 0
    looked = ", ".join(str(d) for d in (args.dirs or default_session_dirs()))
    if not entries:
        console.print(f"no sessions found in {escape(looked)}")
        return 0
    columns = (
        "created",
        "name",
        "status",
        "stages",
        "configuration",
        "perplexity",
        "TriviaQA c/o",
        "params (nonzero)",
        "path",
    )
    broken = [e for e in entries if e.session is None]
    rows = []
    for e in entries:
        if e.session is None:
            continue
        s, h = e.session, headline(e.session)
        ppl = "-" if h["perplexity"] is None else f"{h['perplexity']:.2f} ({h['protocol'] or ''})"
        qa = " / ".join("-" if h[k] is None else f"{100 * h[k]:.1f}%" for k in ("triviaqa_closed", "triviaqa_open"))
        params = "-" if h["params"] is None else f"{h['params']:,} ({h['params_nonzero'] or 0:,})"
        config = " + ".join(x for x in (h["configuration"], h["lora"], h["quantization"]) if x)
        row = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created)),
            f"{s.title} ({s.id})",
            s.status,
            f"{h['stages_done']}/{h['stages']}",
            config,
            ppl,
            qa,
            params,
            str(e.path),
        )
        rows.append(tuple(printable(cell) for cell in row))  # no escape sequence, newline or tab in a cell
    if piped(console):  # plain tab-separated text, every column, nothing cut
        if rows:
            sys.stdout.write("\t".join(columns) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    elif rows:
        console.print(sessions_table(columns, rows, console.width, looked))
    for e in broken:
        console.print(f"[red]unreadable:[/red] {escape(printable(e.error or str(e.path)))}", soft_wrap=True)
    return 0
