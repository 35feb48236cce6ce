"""`frankenlab replay`, `frankenlab compare`, `frankenlab sessions`: saved sessions, headless.

replay SESSION [--from-stage K] [--tolerance T]   re-run a session's recipe, print new vs saved
compare [S1 S2 ...] [--format md|csv|json]         one table of many sessions (thesis-style)
sessions [DIR ...]                                 list saved sessions with their headline numbers
sessions --save SESSION [--name N]                 copy a session into the user's session folder
A SESSION is a session.json file or the run folder holding one. With no paths, compare and
sessions look in ./runs and the user's session folder ($FRANKENLAB_SESSIONS, else
$XDG_DATA_HOME/frankenlab/sessions, else ~/.local/share/frankenlab/sessions).
Exit codes: 0 fine, 1 a replay number out of tolerance (or the replay did not finish), 2 unusable input.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from frankenlab.sessions.printable import printable
from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import make_console, piped
from frankenlab.tui.cli.signals import ctrl_c_cancels


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


# -- helpers ---------------------------------------------------------------------------------------
def _load_all(paths: list[str], console: Console):
    """Sessions named by paths (files, run folders, or folders of runs); unreadable ones reported."""
    from frankenlab.sessions import SessionError, list_sessions, load_session

    found, problems = [], 0
    if not paths:
        entries = list_sessions(None)
    else:
        entries = []
        for p in paths:
            pp = Path(p).expanduser()
            if pp.is_file() or (pp / "session.json").is_file() or not pp.exists():
                from frankenlab.sessions.store import SessionEntry

                try:
                    entries.append(SessionEntry(pp, load_session(pp)))
                except SessionError as exc:
                    entries.append(SessionEntry(pp, None, str(exc)))
            else:
                entries += sorted(list_sessions([pp]), key=lambda e: e.sort_time)
    for e in entries:
        if e.session is None:
            problems += 1
            console.print(f"[red]skipped:[/red] {escape(printable(e.error or str(e.path)))}")
        else:
            found.append(e.session)
    return found, problems


def _fmt(v, digits: int = 6) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.{digits}g}"


# -- replay ----------------------------------------------------------------------------------------
def diff_table(result) -> Table:
    """New beside saved. A metric measured under one protocol names it in the caption (keeps the
    table inside 80 columns); a metric under several protocols names it in each row."""
    protocols: dict[str, set] = {}
    for d in result.diffs:
        if d.protocol != "count":
            protocols.setdefault(d.name, set()).add(d.protocol)
    single = {n: next(iter(p)) for n, p in protocols.items() if len(p) == 1}
    caption = "; ".join(f"{n}: {p}" for n, p in single.items() if p)
    t = Table(
        title=f"replay of {escape(printable(result.saved.title))} ({escape(printable(result.saved.id))}), tolerance "
        f"{100 * result.tolerance:g} % relative",
        caption=escape(caption) or None,
        box=box.SIMPLE_HEAD,
    )
    t.add_column("stage", no_wrap=True)
    t.add_column("metric", overflow="fold", min_width=14)
    for col in ("saved", "replayed", "diff", "relative"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    for d in result.diffs:
        rel = d.relative
        flag = {
            "ok": "[green]ok[/green]",
            "changed": "[bold red]CHANGED[/bold red]",
            "missing": "[yellow]missing[/yellow]",
            "new": "[yellow]new[/yellow]",
        }[d.status]
        diff = d.diff
        metric = escape(d.name if d.protocol == "count" or d.name in single else f"{d.name} [{d.protocol}]")
        t.add_row(
            f"{d.stage} {d.kind}",
            metric,
            _fmt(d.saved),
            _fmt(d.new),
            "-" if diff is None else (f"{diff:+.4g}" if diff else "0"),
            "-" if rel is None else f"{100 * rel:+.3g} %",
            flag,
        )
    return t


def replay_main(args) -> int:
    from frankenlab.sessions import DEFAULT_TOLERANCE, SessionError, load_session, replay
    from frankenlab.tui.cli.run import ProgressView

    console = make_console()
    try:
        saved = load_session(args.session)
    except SessionError as exc:
        console.print(f"[bold red]cannot replay:[/bold red] {escape(str(exc))}")
        return 2
    from frankenlab.tui.cli.run import default_out

    out = Path(args.out) if args.out else default_out(str(saved.recipe.get("name") or "session"), "-replay")
    device = None if args.device == "auto" else args.device  # "auto" (the default): the session's own
    dtype = None if args.dtype == "auto" else args.dtype
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    cancel, restore_sigint = ctrl_c_cancels(console, "cancelling")
    from frankenlab.pipeline.runlock import RunFolderBusy

    console.print(
        f"replaying [bold]{escape(printable(saved.title))}[/bold] ({escape(printable(saved.id))}) "
        f"from stage {args.from_stage} "
        f"into {escape(str(out))}"
    )
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            result = replay(
                saved,
                out,
                from_stage=args.from_stage,
                tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                model=args.model,
                device=device,
                dtype=dtype,
                data_dir=args.data_dir,
                listener=ProgressView(console, progress),
                cancel=cancel,
                save_models=not args.no_save_models,
            )
    except (SessionError, RunFolderBusy) as exc:
        console.print(f"[bold red]cannot replay:[/bold red] {escape(str(exc))}")
        return 2
    finally:
        restore_sigint()
    console.print(diff_table(result))
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    flagged = result.flagged
    nothing = result.nothing_compared()
    if nothing and not flagged:  # never "every number is within 1 %" of nothing
        console.print(f"[yellow]{escape(nothing)}[/yellow]")
        if not result.compared:
            console.print(f"new session written to [bold]{escape(str(result.new.path))}[/bold]")
            return 1
    if result.ok and not nothing:
        console.print(f"[green]every number is within {100 * result.tolerance:g} % of the saved session[/green]")
    elif result.ok:
        console.print("[green]the counts match the saved session[/green]")
    else:
        console.print(
            f"[bold red]{len(flagged)} number(s) differ beyond {100 * result.tolerance:g} %"
            f"{'' if result.new.status == 'done' else f'; the replay ended {result.new.status}'}"
            "[/bold red]"
        )
    console.print(f"new session written to [bold]{escape(str(result.new.path))}[/bold]")
    return 0 if result.ok else 1


# -- compare ---------------------------------------------------------------------------------------
def compare_main(args) -> int:
    from frankenlab.sessions import compare_table, format_table
    from frankenlab.sessions.compare import format_value

    if len(args.sessions) == 1 and (Path(args.sessions[0]) / "sweep.json").is_file():  # a sweep folder
        from frankenlab.tui.cli.sweep import compare_sweep

        return compare_sweep(args)
    err = make_console(stderr=True)
    sessions, problems = _load_all(args.sessions, err)
    if not sessions:
        err.print(
            "[bold red]no sessions to compare[/bold red]"
            + ("" if args.sessions else " (none in ./runs or the user's session folder; pass session files or folders)")
        )
        return 2
    table = compare_table(sessions, all_stages=args.all_stages)
    fmt = args.fmt or ("table" if sys.stdout.isatty() and not args.output else "md")
    if fmt == "table":
        t = Table(title=f"{len(sessions)} session(s)", caption="\n".join(table.notes) or None)
        for c in table.columns:
            t.add_column(escape(printable(c.title)), justify="left" if c.kind == "text" else "right")
        for r in table.rows:
            t.add_row(*(escape(format_value(r.get(c.key), c.kind)) for c in table.columns))
        text = None
        if args.output:  # a file: as wide as the table, written through the output-path guard
            import io

            from frankenlab.pipeline.atomic import atomic_write_text

            buf = io.StringIO()
            make_console(file=buf).print(t)
            text = buf.getvalue()
            try:
                atomic_write_text(Path(args.output), text)
            except OSError as exc:
                err.print(
                    f"[bold red]cannot write {escape(args.output)}:[/bold red] {escape(str(exc.strerror or exc))}"
                )
                return 2
            text = None
        else:
            make_console().print(t)
    else:
        text = format_table(table, fmt)
        if args.output:
            from frankenlab.pipeline.atomic import atomic_write_text

            try:
                atomic_write_text(Path(args.output), text)
            except OSError as exc:
                err.print(
                    f"[bold red]cannot write {escape(args.output)}:[/bold red] {escape(str(exc.strerror or exc))}"
                )
                return 2
        else:
            sys.stdout.write(text)
    if args.output:
        err.print(f"wrote {len(table.rows)} row(s) to {escape(args.output)}")
    return 1 if problems and args.sessions else 0  # a named file that could not be read is an error


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
