"""`frankenlab sweep FILE --out DIR [--dry-run] [--ray | --ray-address ADDR]`: a grid of configurations.

Prints the expanded configurations and the shared prefixes (`--dry-run` stops there), then runs
every missing node, one line per node, and ends with the thesis' tables and the Pareto front
(written to DIR/tables). Ctrl-C once stops after the current batch; finished nodes are kept and a
rerun of the same command does only what is missing. `frankenlab sweeps` lists the bundled sweeps;
`frankenlab compare DIR` remakes the tables of a sweep folder.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import make_console
from frankenlab.tui.cli.signals import cancelled_exit_code, ctrl_c_cancels


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of configurations sharing every common prefix (a sweep file)",
        description="Expand a sweep file (a base recipe plus axes), compute every shared prefix "
        "once, write one session per configuration, the thesis' tables and a Pareto plot.",
    )
    p.add_argument("sweep", help="sweep TOML file, or a bundled sweep name (see `frankenlab sweeps`)")
    options.add(
        p,
        "out",
        notes={"out": "required: the sweep folder; a rerun into it reuses finished work"},
        out={"required": True},
    )
    p.add_argument("--dry-run", action="store_true", help="print the configurations and what they share, run nothing")
    p.add_argument(
        "--no-estimate",
        action="store_true",
        help="print no estimated duration (it measures this machine's rates once, then reads them from the cache)",
    )
    p.add_argument("--ray", action="store_true", help="run the jobs as Ray tasks on a local Ray instance")
    p.add_argument(
        "--ray-address",
        default=None,
        help="run the jobs on this Ray cluster (e.g. ray://host:10001 or auto); DIR must be on storage every node sees",
    )
    options.add(p, "model", "data_dir", notes={"model": "default: the base recipe's model"})
    p.set_defaults(func=main)
    s = sub.add_parser("sweeps", help="list the bundled sweeps")
    s.set_defaults(func=list_sweeps)


def list_sweeps(args) -> int:
    from frankenlab.sessions.sweep import bundled_sweeps, load_sweep

    console = make_console()
    for name in bundled_sweeps():
        sw = load_sweep(name)
        axes = " x ".join(f"{a.name}[{len(a.values)}]" for a in sw.axes)
        console.print(f"[bold]{name}[/bold]  [dim]{axes}[/dim]  {escape(sw.description)}", soft_wrap=True)
    return 0


LIST_LIMIT = 200  # configurations listed one a line; beyond it the grid is summarised
SAMPLE_FIRST = 20  # a summarised grid lists its first configurations (and validates one per axis value)
WARN_CONFIGS = 1000  # a grid bigger than this is warned about
WARN_SECONDS = 7 * 86400  # and one estimated to take longer than this


def describe(console: Console, sweep, configs, out: Path, *, estimate: bool = False, data_dir=None) -> None:
    """The configurations, the shared prefixes and what is left to compute; with `estimate`, each
    node's estimated duration and the grid's total (`pipeline.estimate`). `configs` None: the grid
    is too big to list, so a sample is validated and listed and the nodes are counted from the axes."""
    from frankenlab.sessions.sweep import build_tree
    from frankenlab.sessions.sweep.tree import find_node

    total = sweep.size
    sample = configs is None
    if sample:
        configs = sweep.configurations(sweep.sample_indices(SAMPLE_FIRST))
    nodes, chains = build_tree(configs)
    count = sweep.node_bound() if sample else len(nodes)
    console.print(
        f"[bold]{escape(sweep.name)}[/bold]: {total:,} configuration(s), {'at most ' if sample else ''}{count:,} "
        f"node(s) (a node = the model after a prefix of stages, computed once)",
        highlight=False,
    )
    if sample:
        axes = " x ".join(f"{a.name}[{len(a.values)}]" for a in sweep.axes)
        console.print(
            f"  [dim]too many to list: {escape(axes)}; {len(configs)} configuration(s) checked (the first "
            f"{min(SAMPLE_FIRST, total)}, the last, every value of every axis), the first shown[/dim]",
            highlight=False,
        )
    for c in configs[: SAMPLE_FIRST if sample else None]:
        console.print(
            f"  {c.index:>3}  {escape(c.label)}  [dim]{' > '.join(s.kind for s in c.recipe.stages) or 'baseline'}[/dim]"
        )
    if sample and total > SAMPLE_FIRST:
        console.print(f"  ... {total - SAMPLE_FIRST:,} more", highlight=False)
    shared = [n for n in nodes.values() if len(n.configs) > 1 and n.index > 0]
    if shared and not sample:
        console.print("shared prefixes:")
        for n in shared[:LIST_LIMIT]:
            console.print(f"  {n.key}  {escape(n.label)}  [dim]used by {len(n.configs)} configurations[/dim]")
        if len(shared) > LIST_LIMIT:
            console.print(f"  ... {len(shared) - LIST_LIMIT:,} more shared prefixes", highlight=False)
    done = sum(1 for n in nodes.values() if find_node(out, n) is not None)  # old-format keys count too
    if not sample:
        console.print(
            f"{done} of {len(nodes)} node(s) already finished in {escape(str(out))}; {len(nodes) - done} to compute",
            highlight=False,
        )
    seconds = None
    if estimate:
        seconds = print_grid_estimate(console, nodes, chains, configs, data_dir, count if sample else None, out)
    if total > WARN_CONFIGS or (seconds is not None and seconds > WARN_SECONDS):
        from frankenlab.pipeline.estimate import human

        why = f"{total:,} configurations" + (f", {human(seconds)} of work" if seconds is not None else "")
        console.print(
            f"[yellow]warning: a big grid ({why}): narrow an axis, or run it on a cluster (--ray-address)[/yellow]",
            highlight=False,
        )


def no_estimate(args) -> bool:
    from frankenlab.tui.cli.run import no_estimate as off

    return off(args)


def print_grid_estimate(console: Console, nodes, chains, configs, data_dir, node_count, out: Path) -> float | None:
    """Each node's estimated duration (a sample's nodes, for a big grid) and the total, nodes already
    finished in `out` not counted; the estimated wall seconds, or None when no estimate could be made."""
    from frankenlab.pipeline.estimate import estimate_grid, human
    from frankenlab.sessions.sweep.tree import find_node

    todo = {k: n for k, n in nodes.items() if node_count is not None or find_node(out, n) is None}
    try:
        with console.status("estimating the duration: measuring this machine's rates once (cached)"):
            grid = estimate_grid(todo, chains, configs, data_dir, node_count)
    except Exception as exc:  # noqa: BLE001 - an estimate never stops a sweep
        console.print(f"[dim]no duration estimate: {escape(f'{type(exc).__name__}: {exc}'.splitlines()[0])}[/dim]")
        return None
    console.print("estimate per node to compute (each shared prefix once):")
    rows = [(k, grid.nodes[k]) for k in todo if k in grid.nodes]
    for k, st in rows[:LIST_LIMIT]:
        console.print(
            f"  {k}  {escape(nodes[k].label)}  [dim]{human(st.wall)} ({st.wall:,.0f} s, {st.cpu:,.0f} CPU-s)[/dim]",
            highlight=False,
        )
    if len(rows) > LIST_LIMIT:
        console.print(f"  ... {len(rows) - LIST_LIMIT:,} more nodes", highlight=False)
    scaled = f", scaled from {grid.scaled_from} sampled node(s) to {node_count:,}" if grid.scaled_from else ""
    console.print(
        f"[bold]estimate: {human(grid.wall)} for the grid ({grid.wall:,.0f} s wall, {grid.cpu:,.0f} CPU-s, one job "
        f"at a time{scaled})[/bold]",
        highlight=False,
    )
    if grid.measured:
        console.print(
            f"  [dim]rates measured now ({', '.join(grid.measured)}): {grid.probe_wall:.0f} s wall, "
            f"{grid.probe_cpu:.0f} CPU-s; cached[/dim]",
            highlight=False,
        )
    return grid.wall


PROGRESS_EVERY_S = 10.0  # a running node's progress line, at most this often (and at each new stage)


class LineView:
    """One line per node start and finish, and the running nodes' progress lines between them
    (each node's first, each new stage's first, then one per `PROGRESS_EVERY_S`)."""

    def __init__(self, console: Console, every: float = PROGRESS_EVERY_S):
        from frankenlab.sessions.sweep.events import Throttle

        self.console = console
        self.labels: dict[str, str] = {}
        self.throttle = Throttle(every)

    def __call__(self, e) -> None:
        from frankenlab.sessions import sweep as sw

        if isinstance(e, sw.SweepStarted):
            if e.message:
                self.console.print(f"[yellow]{escape(e.message)}[/yellow]")
            self.console.print(f"[bold]{escape(e.name)}[/bold]: {e.todo} node(s) to compute on {e.executor}")
        elif isinstance(e, sw.NodeStarted):
            self.labels[e.key] = e.label
            self.console.print(f"  start   {e.key}  {escape(e.label)}")
        elif isinstance(e, sw.NodeProgress):
            if self.throttle.due(e.key, e.message, e.fraction):
                from frankenlab.sessions.sweep.events import progress_text

                label = escape(self.labels.get(e.key, ""))
                self.console.print(
                    f"  [dim]...     {e.key}  {label}: {escape(progress_text(e))}[/dim]", highlight=False
                )
        elif isinstance(e, sw.NodeFinished):
            style = "green" if e.status == "done" else "red"
            secs = f" ({e.seconds:.1f}s)" if e.seconds else ""
            msg = f": {escape(e.message)}" if e.message else ""
            self.console.print(f"  [{style}]{e.status:<7}[/{style}] {e.key}  {escape(e.label)}{secs}{msg}")
        elif isinstance(e, sw.ConfigFinished):
            self.console.print(f"  [bold]config {e.index}[/bold] {escape(e.label)}: {e.status}")


def main(args) -> int:
    from dataclasses import replace

    from frankenlab.sessions.sweep import SweepError, load_sweep, run_sweep

    console = make_console()
    err = make_console(stderr=True)
    out = Path(args.out)
    try:
        sweep = load_sweep(args.sweep)
        overrides = {"source": args.model} if args.model else {}
        for key in ("device", "dtype"):
            if getattr(args, key, "auto") not in (None, "auto"):
                overrides[key] = getattr(args, key)
        if getattr(args, "trust_remote_code", False):
            overrides["trust_remote_code"] = True
        if overrides:  # the command line's model settings over the sweep's base (--model, --device, ...)
            model = sweep.base.get("model", {})
            model = {"source": model} if isinstance(model, str) else dict(model)
            sweep = replace(sweep, base={**sweep.base, "model": {**model, **overrides}})
        big = args.dry_run and sweep.size > LIST_LIMIT  # summarised: never made one by one
        configs = None if big else sweep.expand()
        if args.dry_run:
            describe(console, sweep, configs, out, estimate=not no_estimate(args), data_dir=args.data_dir)
            return 0
    except SweepError as exc:
        err.print(f"[bold red]sweep error:[/bold red] {escape(str(exc))}")
        return 2
    describe(console, sweep, configs, out, estimate=not no_estimate(args), data_dir=args.data_dir)
    problem = inputs_problem(configs, args.data_dir)  # as `run` does, before any job loads a model
    if problem:
        err.print(f"[bold red]cannot run the sweep:[/bold red] {escape(problem)}")
        return 2
    executor = None
    if args.ray or args.ray_address:
        from frankenlab.sessions.sweep import RayExecutor

        try:
            executor = RayExecutor(address=args.ray_address, device=configs[0].recipe.model.device)
        except RuntimeError as exc:
            err.print(f"[bold red]{escape(str(exc))}[/bold red]")
            return 2
    from frankenlab.pipeline.runlock import RunFolderBusy
    from frankenlab.tui import noise

    busy = _live_sweep(out)
    if busy:  # before the log is opened: a live sweep's folder is not touched at all
        err.print(f"[bold red]cannot run the sweep:[/bold red] {escape(busy)}")
        return 2
    noise.attach(out / "sweep.log")
    from frankenlab.tui.cli.bars import bars_to_log

    bars_to_log(out / "sweep.log")  # third-party progress bars too
    cancel, restore = ctrl_c_cancels(console, "stopping the sweep")
    try:
        record = run_sweep(
            sweep,
            out,
            executor=executor,
            listener=LineView(console),
            cancel=cancel,
            data_dir=args.data_dir,
            configs=configs,
        )
    except RunFolderBusy as exc:
        err.print(f"[bold red]cannot run the sweep:[/bold red] {escape(str(exc))}")
        return 2
    except OSError as exc:
        err.print(f"[bold red]cannot write the sweep folder {escape(str(out))}: {exc.strerror or exc}[/bold red]")
        return 2
    finally:
        restore()
    report(console, out)
    for n in record["nodes"].values():
        if n["index"] > 0 and n["shared_by"] > 1:
            console.print(
                f"shared node {escape(n['label'])}: computed {n['computed']} time(s) in all runs, "
                f"used by {n['shared_by']} configurations",
                highlight=False,
            )
    run = record["runs"][-1]
    console.print(
        f"{record['status']}: {run['nodes_computed']} node(s) computed, {run['nodes_reused']} reused from "
        f"earlier runs, {record['cache_hits']['shared']} shared-prefix hit(s); record: "
        f"{escape(str(out / 'sweep.json'))}",
        highlight=False,
    )
    return {"done": 0, "cancelled": cancelled_exit_code(cancel)}.get(record["status"], 1)


def inputs_problem(configs, data_dir) -> str | None:
    """Why a configuration cannot run, checked for every one before any job starts (None when all can):
    the data each reads (missing, unreadable, bad rows, fewer questions or documents than asked) and
    its stages' preflight hooks, as `frankenlab run` checks them, then the sequence lengths against
    the model's config.json."""
    from frankenlab.evals.data import DataNotFound
    from frankenlab.pipeline.preflight import check_sizes, model_config, preflight

    configs_of: dict[str, dict | None] = {}
    seen: set = set()  # a stage hook asked once per stage config (LoRA's overlap check reads whole files)
    for c in configs:
        try:
            preflight(c.recipe, data_dir, seen)
            source = c.recipe.model.source
            if source not in configs_of:
                configs_of[source] = model_config(source)
            check_sizes(c.recipe, configs_of[source])
        except (DataNotFound, ValueError) as exc:  # RecipeError and DataError are ValueErrors
            return f"configuration {c.index} ({c.label}): {exc}"
    return None


def _live_sweep(out: Path) -> str | None:
    """Why `out` cannot be swept into now (a live sweep holds its lock), or None; takes nothing over."""
    import json

    from frankenlab.pipeline.runlock import LOCK_FILE, describe_owner, owner_alive

    try:
        other = json.loads((out / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(other, dict) and owner_alive(other) is not False:
        return (
            f"{out} is in use by a live sweep ({describe_owner(other)}): wait for it to finish, "
            "or choose another folder (--out DIR)"
        )
    return None


def report(console: Console, out: Path) -> None:
    """Write the tables and the Pareto plot; print Table 4.1 (or 4.2) and the front."""
    from frankenlab.sessions.sweep.results import (
        budget_bytes,
        pareto_points,
        pareto_text,
        render,
        sweep_sessions,
        thesis_tables,
        write_results,
    )

    _, sessions = sweep_sessions(out)
    if not sessions:
        console.print("no configuration finished yet: no tables")
        return
    written = write_results(out, sessions)
    for name, table in thesis_tables(sessions).items():
        console.print(f"[bold]{name}[/bold]")
        console.print(escape(render(table, "md")), highlight=False, soft_wrap=True)
    points, title, _ = pareto_points(sessions)
    console.print(pareto_text(points, title, budget_bytes()), highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"tables and the Pareto figure (pareto.svg, pareto.png) in {escape(str(Path(written['pareto'][0]).parent))}",
        highlight=False,
    )


def compare_sweep(args) -> int:
    """`frankenlab compare DIR` on a sweep folder: the thesis' tables (all formats) and the Pareto plot."""
    from frankenlab.sessions import SessionError

    out = Path(args.sessions[0])
    try:
        report(make_console(), out)
    except SessionError as exc:
        make_console(stderr=True).print(f"[bold red]{escape(str(exc))}[/bold red]")
        return 2
    if getattr(args, "fmt", None) in ("md", "csv", "json", "tex") and args.output:
        from frankenlab.pipeline.atomic import atomic_write_text
        from frankenlab.sessions.sweep.results import render, sweep_sessions, thesis_tables

        tables = thesis_tables(sweep_sessions(out)[1])
        atomic_write_text(Path(args.output), "\n".join(render(t, args.fmt) for t in tables.values()))
    return 0
