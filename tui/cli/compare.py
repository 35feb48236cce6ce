"""`frankenlab compare`: many saved sessions as one table (terminal, md, csv, json).

Split out of `tui/cli/sessions.py` (which still registers the subcommand, so the order in
`--help` stays replay, compare, sessions): gathering sessions from paths and writing the
comparison table are their own job, apart from replaying or listing sessions.
Exit codes: 0 fine, 1 a named session could not be read, 2 nothing to compare or unwritable output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from frankenlab.sessions.printable import printable
from frankenlab.tui.cli.console import make_console


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
