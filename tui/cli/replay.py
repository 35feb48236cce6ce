"""`frankenlab replay`: re-run a saved session's recipe and print new beside saved.

Split out of `tui/cli/sessions.py` (which still registers the subcommand, so the order in
`--help` stays replay, compare, sessions): the replay job (progress, Ctrl-C, the diff table and
its exit code) is its own concern, apart from listing and comparing saved sessions.
Exit codes: 0 fine, 1 a number out of tolerance (or the replay did not finish), 2 unusable input.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.markup import escape
from rich.table import Table

from frankenlab.sessions.printable import printable
from frankenlab.tui.cli.console import make_console
from frankenlab.tui.cli.signals import ctrl_c_cancels


def _fmt(v, digits: int = 6) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.{digits}g}"


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
