"""`frankenlab run RECIPE --out DIR`: run a recipe headless with rich progress bars.

Ctrl-C once asks the runner to stop after the current batch (the session keeps every finished
stage); Ctrl-C twice stops at once, still writing the session.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from frankenlab.pipeline import events as ev
from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import make_console
from frankenlab.tui.cli.signals import cancelled_exit_code, ctrl_c_cancels


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a recipe headless and write DIR/session.json",
        description="Run a recipe (TOML file, or a bundled recipe name such as depth2) headless.",
    )
    p.add_argument("recipe", help="recipe TOML file, or the name of a bundled recipe (see `frankenlab recipes`)")
    options.add(
        p,
        "out",
        "model",
        "no_save_models",
        "data_dir",
        notes={"out": "default: runs/<recipe name>-<time>", "model": "default: the recipe's model"},
    )
    p.add_argument(
        "--no-estimate",
        action="store_true",
        help="start at once, without printing the estimated duration per stage (pipeline.estimate)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out folder that holds a session: the old session, recipe, log and stage "
        "folders are moved to OUT/previous-<time>/ (never deleted)",
    )
    p.set_defaults(func=main)
    r = sub.add_parser("recipes", help="list the bundled example recipes")
    r.set_defaults(func=list_recipes)


def list_recipes(args) -> int:
    """One line per bundled recipe: name, stages, description (cut to the terminal's width)."""
    from rich.text import Text

    import frankenlab.pipeline
    from frankenlab.evals import toml

    RECIPES_DIR = (
        Path(frankenlab.pipeline.__file__).parent / "recipes"
    )  # pipeline.recipe.RECIPES_DIR, without its imports
    console = make_console()  # the TOML is read as it is: validating would import every stage (and torch)
    rows = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        data = toml.loads(path.read_text())
        kinds = ">".join(str(s.get("kind", "?")) for s in data.get("stages", []) if isinstance(s, dict))
        rows.append((path.stem, kinds or "-", str(data.get("description", ""))))
    wn, ws = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    narrow = console.width < wn + ws + 12  # too narrow for the names: whole lines, the terminal wraps them
    for name, stages, description in rows:
        line = Text(f"{name:<{wn}}  ", style="bold")
        line.append(f"{stages:<{ws}}  ", style="dim")
        line.append(description)
        if narrow:
            console.print(line, soft_wrap=True)
            continue
        line.truncate(console.width, overflow="ellipsis")
        console.print(line, no_wrap=True, overflow="ellipsis")
    return 0


def default_out(recipe_name: str, suffix: str = "") -> Path:
    """runs/<slug of the name><suffix>-<time>: a recipe's name never leaves ./runs ("../x", "/etc/x")."""
    import time

    from frankenlab.pipeline.runlock import safe_slug

    return Path("runs") / f"{safe_slug(recipe_name, 'run')}{suffix}-{time.strftime('%Y%m%d-%H%M%S')}"


class ProgressView:
    """Turns runner events into rich progress bars and log lines."""

    def __init__(self, console: Console, progress: Progress):
        self.console, self.progress = console, progress
        self.tasks: dict[int, int] = {}
        self.failure_cause: str | None = None  # "input" when the run failed on something the user can fix

    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, ev.StageStarted):
            self.tasks[e.stage] = self.progress.add_task(f"[{e.stage}] {e.kind}", total=1.0)
        elif isinstance(e, ev.Progress) and e.stage in self.tasks:
            self.progress.update(self.tasks[e.stage], completed=e.fraction, description=f"[{e.stage}] {e.message[:60]}")
        elif isinstance(e, ev.MetricMeasured) and e.step is None:
            self.console.print(f"  [{e.stage}] {e.name} = {e.value:.4g}  [dim]({escape(e.protocol)})[/dim]")
        elif isinstance(e, ev.LogLine):
            style = "red" if e.level == "error" else "dim"
            text = e.message.strip().splitlines()[-1] if e.level == "error" and "Traceback" in e.message else e.message
            self.console.print(f"[{style}]{escape(text)}[/{style}]")  # `[[stages]]` in a message stays as written
        elif isinstance(e, ev.StageFinished) and e.stage in self.tasks:
            self.progress.update(
                self.tasks[e.stage], completed=1.0, description=f"[{e.stage}] {e.kind} done ({e.seconds:.1f}s)"
            )
        elif isinstance(e, ev.RunFailed):
            self.failure_cause = e.cause
            self.console.print(f"[bold red]failed: {escape(e.message)}[/bold red]")
        elif isinstance(e, ev.RunCancelled):
            self.console.print(f"[bold yellow]cancelled: {escape(e.message)}[/bold yellow]")


def _value(m: dict) -> str:
    """A perplexity as a number; an accuracy with its count and 95 % Wilson interval."""
    if m.get("n") is None or m["name"] == "perplexity" or m.get("value") is None:
        return f"{m['value']:.3f}" if isinstance(m.get("value"), (int, float)) else str(m.get("value"))
    from frankenlab.evals.stats import format_accuracy

    return format_accuracy(m["value"], m["n"], m.get("ci95"))


def results_table(session) -> Table:
    from frankenlab.sessions.printable import printable

    table = Table(title=escape(f"session {printable(session.id)} ({session.status})"))
    for col in ("#", "stage", "status", "layers", "params (nonzero)", "metrics", "seconds"):
        table.add_column(col)
    for st in session.stages:
        metrics = ", ".join(f"{m['name']} {_value(m)} ({m.get('protocol', '')})" for m in st.metrics)
        params = f"{st.params_count:,} ({st.params_nonzero:,})" if st.params_count else "-"
        table.add_row(
            str(st.index),
            escape(printable(st.name or st.kind)),
            st.status,
            str(st.num_layers or "-"),
            params,
            metrics or "-",
            f"{st.seconds:.1f}" if st.seconds else "-",
        )
    return table


def main(args) -> int:
    from frankenlab.evals.errors import RecipeError
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import record_run

    console = make_console()
    try:
        recipe = Recipe.load(args.recipe)
    except RecipeError as exc:
        console.print(f"[bold red]recipe error:[/bold red] {escape(str(exc))}")
        return 2
    try:
        recipe.model = model_overrides(recipe.model, args)
    except RecipeError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return 2
    out = Path(args.out) if args.out else default_out(recipe.name)
    from frankenlab.pipeline.atomic import UnsafeOutputPath
    from frankenlab.pipeline.runlock import RunFolderBusy
    from frankenlab.sessions.store import claim_run_folder

    try:  # a session already there is never replaced without a word (--force moves it aside)
        moved = claim_run_folder(out, force=getattr(args, "force", False))
    except (RunFolderBusy, UnsafeOutputPath) as exc:
        console.print(f"[bold red]cannot run:[/bold red] {escape(str(exc))}")
        return 2
    except OSError as exc:
        console.print(f"[bold red]cannot run:[/bold red] {escape(f'{out}: {exc.strerror or exc}')}")
        return 2
    if moved:
        console.print(f"[dim]{escape(moved)}[/dim]")
    from frankenlab.tui import noise

    noise_log = noise.attach(out / "run.log")  # third-party warnings and log lines, not the terminal
    from frankenlab.tui.cli.bars import bars_to_log

    bars_to_log(out / "run.log")  # and third-party progress bars
    estimate = None if no_estimate(args) else print_estimate(console, recipe, args.data_dir)
    from frankenlab.pipeline.estimate import StageClock

    clock = StageClock()
    cancel, restore_sigint = ctrl_c_cancels(console, "cancelling")

    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            view = ProgressView(console, progress)
            session = record_run(
                recipe,
                out,
                listener=view,
                listeners=(clock,),
                cancel=cancel,
                save_models=not args.no_save_models,
                data_dir=args.data_dir,
            )
    except RunFolderBusy as exc:
        console.print(f"[bold red]cannot run:[/bold red] {escape(str(exc))}")
        return 2
    finally:
        restore_sigint()
    console.print(results_table(session))
    if estimate is not None and not session.save_error:
        keep_outcome(console, session, out, estimate, clock)
    if session.save_error:
        console.print(f"[bold red]{escape(session.save_error)}[/bold red]")
        return 2
    console.print(f"session written to [bold]{out / 'session.json'}[/bold]")
    if noise_log is not None and noise.route().count:
        console.print(f"[dim]{noise.route().count} third-party log line(s) and warning(s) are in {noise_log}[/dim]")
    if session.status == "failed" and view.failure_cause == "input":
        return 2  # bad input (recipe, data, model file, disk): fixable, not a crash
    return {"done": 0, "cancelled": cancelled_exit_code(cancel)}.get(session.status, 1)


def no_estimate(args) -> bool:
    """--no-estimate, or FRANKENLAB_ESTIMATE=0 in the environment (the test suite sets it)."""
    import os

    return bool(getattr(args, "no_estimate", False)) or os.environ.get("FRANKENLAB_ESTIMATE", "1") == "0"


def print_estimate(console: Console, recipe, data_dir):
    """Print the estimated duration per stage and in all (`pipeline.estimate`); None when it cannot."""
    from frankenlab.pipeline.estimate import estimate_recipe

    try:
        with console.status("estimating the duration: measuring this machine's rates once (cached)"):
            estimate = estimate_recipe(recipe, data_dir)
    except Exception as exc:  # noqa: BLE001 - an estimate never stops a run
        console.print(f"[dim]no duration estimate: {escape(f'{type(exc).__name__}: {exc}'.splitlines()[0])}[/dim]")
        return None
    for s in estimate.stages:
        console.print(f"  [dim]{escape(s.line())}[/dim]", highlight=False)
    console.print(f"[bold]{escape(estimate.total_line())}[/bold]", highlight=False)
    console.print(f"  [dim]{escape(estimate.probe_line())}[/dim]", highlight=False)
    return estimate


def keep_outcome(console: Console, session, out: Path, estimate, clock) -> None:
    """The estimate beside the measured seconds in the session (`estimate`), and the cache corrected."""
    from frankenlab.pipeline.estimate import record_outcome

    try:
        session.extra["estimate"] = record_outcome(estimate, clock.seconds, estimate.cache)
        session.save(out / "session.json")
    except OSError as exc:
        console.print(f"[dim]the estimate was not kept: {escape(str(exc))}[/dim]")
        return
    cpu = sum(v[1] for v in clock.seconds.values())
    wall = sum(v[0] for v in clock.seconds.values())
    console.print(
        f"[dim]estimated {estimate.wall:,.0f} s wall, {estimate.cpu:,.0f} CPU-s; measured {wall:,.0f} s wall, "
        f"{cpu:,.0f} CPU-s[/dim]",
        highlight=False,
    )


def model_overrides(model, args):
    """The recipe's [model] with what the command line gave: --model, and --device, --dtype,
    --trust-remote-code when set (their defaults, auto and off, keep the recipe's own)."""
    from dataclasses import replace

    changes = {"source": args.model} if args.model else {}
    if getattr(args, "device", "auto") not in (None, "auto"):
        changes["device"] = args.device
    if getattr(args, "dtype", "auto") not in (None, "auto"):
        changes["dtype"] = args.dtype
    if getattr(args, "trust_remote_code", False):
        changes["trust_remote_code"] = True
    return replace(model, **changes) if changes else model
