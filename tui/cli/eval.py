"""`frankenlab eval`: measure one model headless (perplexity, TriviaQA, HellaSwag, generation samples).

    frankenlab eval --model M --ppl wikitext2-rows-512 --ppl wikitext2-concat-512 --limit 64
    frankenlab eval --model M --triviaqa-closed 200 --triviaqa-open 200 --samples --json out.json
    frankenlab eval --triviaqa-closed 200 --match thesis      # the thesis' whole-answer matching
    frankenlab eval --hellaswag 500 --plan 0-3,5,5,6-29       # a Franken layer plan, run time only
    frankenlab eval --preset thesis                           # thesis section 3.6 (slow on a CPU)

With no task named it scores both WikiText-2 protocols. Every number is printed with its protocol,
accuracies with their question count and 95 % Wilson interval; `--json` writes metrics,
per-question records and samples (with degeneration metrics) for later inspection.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import make_console
from frankenlab.tui.cli.signals import cancelled_exit_code, ctrl_c_cancels

DEFAULT_PPL = ("wikitext2-rows-512", "wikitext2-concat-512")


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity, TriviaQA, generation samples",
        description="Evaluate a model headless. Perplexity protocols: <data>-rows-<len> (each row a "
        "sequence, the thesis protocol) or <data>-concat-<len> (rows joined with blank "
        "lines, non-overlapping windows, GPTQ/WANDA); <data> is wikitext2, c4, wiki or "
        "a local .txt/.jsonl file.",
    )
    options.add(p, "model", "device", "dtype", "trust_remote_code")
    p.add_argument(
        "--ppl",
        action="append",
        default=None,
        metavar="PROTOCOL",
        help="perplexity protocol, repeatable (default, when no task is named: " + " and ".join(DEFAULT_PPL) + ")",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N rows/windows per protocol (default: the whole split)",
    )
    p.add_argument("--stride", type=int, default=None, help="window stride for concat protocols (default: length)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="perplexity batch, in full-length sequences (default 4)",
    )
    p.add_argument("--triviaqa-closed", type=int, default=None, metavar="N", help="closed-book TriviaQA questions")
    p.add_argument(
        "--triviaqa-open",
        type=int,
        default=None,
        metavar="N",
        help="open-book questions (NQ-open with gold passages offline)",
    )
    p.add_argument(
        "--open-book",
        default=None,
        choices=("nq-open", "triviaqa-rc"),
        help="open-book source: NQ-open with gold passages (local data, default) or TriviaQA rc (hub)",
    )
    p.add_argument("--qa-batch-size", type=int, default=None, metavar="B", help="questions generated together (8)")
    p.add_argument(
        "--match",
        default=None,
        choices=("first-line", "thesis", "first-line-noecho"),
        help="QA match protocol: first-line (default: the answer's first line), thesis (the whole "
        "answer, up to 50 new tokens, as the thesis scored it; more lenient) or first-line-noecho (the "
        "first line; an answer that only repeats an alias the question contains does not count)",
    )
    p.add_argument(
        "--triviaqa-file",
        default=None,
        metavar="PATH",
        help="closed-book questions from this file (JSONL with question or context, answer, aliases); "
        "its name goes into the protocol",
    )
    p.add_argument(
        "--hellaswag",
        type=int,
        default=None,
        metavar="N",
        help="HellaSwag validation items: acc and acc_norm (lm-evaluation-harness' formula)",
    )
    p.add_argument(
        "--hellaswag-batch-size",
        type=int,
        default=None,
        metavar="B",
        help="HellaSwag (context, ending) rows per forward pass (16)",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=("thesis",),
        help="a named evaluation; thesis = rows-512 perplexity on the whole test split, 1,200 TriviaQA "
        "questions closed and open book (thesis matching), samples. Slow on a CPU (hours). "
        "Options given beside it override it",
    )
    p.add_argument(
        "--plan",
        default=None,
        metavar="PLAN",
        help="evaluate under a Franken layer plan applied at run time, e.g. 0-3,5,5,6-29 (skips, repeats)",
    )
    p.add_argument(
        "--failures",
        type=int,
        default=0,
        metavar="N",
        help="print N wrongly answered questions per QA task (all are in --json)",
    )
    p.add_argument("--seed", type=int, default=None, help="which questions and HellaSwag items are sampled (0)")
    p.add_argument("--chat-template", action="store_true", help="wrap QA prompts in the model's chat template")
    p.add_argument("--samples", action="store_true", help="greedy generation samples on the fixed prompts")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the full results here")
    options.add(p, "data_dir")
    p.set_defaults(func=main)


def results_table(metrics: list[dict]) -> Table:
    table = Table()
    table.add_column("metric", no_wrap=True)
    table.add_column("value", no_wrap=True)
    table.add_column("EM", no_wrap=True)  # strict exact match beside the match protocol's rule
    table.add_column("protocol", no_wrap=True)  # printed whole with every number
    table.add_column("work")  # the only column that wraps on a narrow terminal
    for m in metrics:
        secs = m.get("seconds") or 0.0
        em = "-"
        if m["name"] == "perplexity":
            value = f"{m['value']:.3f}"
            work = f"{m['tokens']:,} tok, {secs:.1f} s" + (f", {m['tokens'] / secs:.0f} tok/s" if secs else "")
        else:
            n = m.get("n") or 0
            value = f"{100 * m['value']:.1f} % ({m.get('correct', round(m['value'] * n))}/{n})"
            if m.get("exact_match") is not None:
                em = f"{100 * m['exact_match']:.1f} %"
            work = ""
            if m.get("ci95"):  # the Wilson interval: most differences at a few hundred questions are noise
                work = f"95 % CI {100 * m['ci95'][0]:.1f}-{100 * m['ci95'][1]:.1f} %; "
            work += f"{n} {'items' if m['name'].startswith('hellaswag') else 'q'}, {secs:.1f} s"
            if m.get("first_line_accuracy") is not None:
                work += f"; first line alone {100 * m['first_line_accuracy']:.1f} %"
            if m.get("echo_hits") is not None:  # answers that only repeat an alias the question holds
                work += f"; {m['echo_hits']} echo hit(s)"
        table.add_row(m["name"], value, em, m.get("protocol", ""), work)
    return table


def metric_line(m: dict) -> str:
    """One printed line per metric as it is measured: the number, its count and interval, its protocol."""
    if m["name"] == "perplexity" or m.get("n") is None:
        value = f"{m['value']:.4g}"
    else:
        from frankenlab.evals.stats import format_accuracy

        value = format_accuracy(m["value"], m["n"], m.get("ci95"))
        if m.get("echo_hits") is not None:
            value += f", {m['echo_hits']} echo hit(s)"
    return f"  {m['name']} = {value}  [dim]({escape(m['protocol'])})[/dim]"


def build_config(args):
    """The EvalConfig from the options given (a preset's values under the ones given beside it)."""
    from frankenlab.evals.config import from_dict
    from frankenlab.evals.errors import RecipeError
    from frankenlab.evals.suite import EvalConfig

    given = {
        "ppl_limit": args.limit,
        "ppl_stride": args.stride,
        "batch_size": args.batch_size,
        "triviaqa_closed": args.triviaqa_closed,
        "triviaqa_open": args.triviaqa_open,
        "qa_seed": args.seed,
        "qa_batch_size": args.qa_batch_size,
        "open_book": args.open_book,
        "match": args.match,
        "triviaqa_file": args.triviaqa_file,
        "hellaswag": args.hellaswag,
        "hellaswag_batch_size": args.hellaswag_batch_size,
        "preset": args.preset,
    }
    data = {k: v for k, v in given.items() if v is not None}
    if args.limit is None and not args.preset:
        data["ppl_limit"] = 0  # the command's default: the whole split
    if args.chat_template:
        data["chat_template"] = True
    counts = (args.triviaqa_closed, args.triviaqa_open, args.hellaswag)
    named = args.ppl or args.samples or args.preset or any(c is not None for c in counts)  # --hellaswag 0 names it
    if args.ppl or not named:
        data["perplexity"] = list(args.ppl or DEFAULT_PPL)
    elif not args.preset:
        data["perplexity"] = []
    if args.samples or not args.preset:
        data["samples"] = bool(args.samples)
    config = from_dict(EvalConfig, data, "eval")
    if not (config.perplexity or config.triviaqa_closed or config.triviaqa_open or config.hellaswag or config.samples):
        raise RecipeError(
            "nothing to evaluate: every task named asks for 0 items; give a count above 0 (e.g. "
            "--triviaqa-closed 200), --ppl PROTOCOL or --samples, or no task for the default perplexity"
        )
    return config


def eval_oom_message(lm, config) -> str:
    """One line for an evaluation that ran out of memory: which model, where, and what to lower."""
    from frankenlab.evals.devices import free_cached_memory, oom_message

    free_cached_memory(lm.device)
    smaller = max(1, config.batch_size // 2)
    return oom_message(
        lm.device,
        f"evaluating {lm.source.name} on {lm.device}",
        f"try --batch-size {smaller} (and --qa-batch-size / --hellaswag-batch-size) or a smaller model",
    )


def main(args) -> int:
    from frankenlab.evals.cancel import Cancelled
    from frankenlab.evals.data import DataNotFound
    from frankenlab.evals.errors import ModelLoadError, RecipeError
    from frankenlab.evals.suite import PRESET_NOTES, check_data, check_lengths, evaluate
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.provenance import weights_origin
    from frankenlab.tui import noise

    console = make_console()
    try:
        config = build_config(args)
    except (RecipeError, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return 2
    problem = json_out_problem(args.json_out)  # told now, not after an evaluation of minutes or hours
    if problem:
        console.print(f"[bold red]error:[/bold red] {escape(problem)}")
        return 2
    if args.json_out:
        noise.attach(str(args.json_out) + ".log")  # third-party warnings beside the results, not on screen
    data_dir = args.data_dir
    try:  # every data file read, its rows checked and the sizes asked of it, before any weights load
        check_data(config, data_dir)  # an unreadable file or folder is a DataError (a ValueError) too
    except (DataNotFound, ValueError) as exc:
        console.print(f"[bold red]data error:[/bold red] {escape(str(exc))}")
        return 2
    try:  # sequence lengths the model cannot take, from its config.json, before any weights load
        check_lengths(config, _model_config(args.model))
    except RecipeError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return 2
    try:
        lm = load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
    except ModelLoadError as exc:
        console.print(f"[bold red]model error:[/bold red] {escape(str(exc))}")
        return 2
    console.print(f"[dim]{lm.source.name} on {lm.device} as {str(lm.dtype).replace('torch.', '')}[/dim]")
    origin = weights_origin(lm.source.to_dict())
    if origin:
        console.print(f"[dim]baseline: {origin['note']}[/dim]")
    if config.preset and lm.device.type == "cpu":
        console.print(f"[yellow]preset {config.preset}: {PRESET_NOTES.get(config.preset, '')}[/yellow]")
    try:
        model_cm = _plan_context(lm.model, args.plan)
    except ValueError as exc:
        console.print(f"[bold red]plan error:[/bold red] {escape(str(exc))}")
        return 2
    cancel, restore_sigint = ctrl_c_cancels(console, "stopping")
    t0 = time.perf_counter()
    try:
        with (
            model_cm as model,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress,
        ):
            task = progress.add_task("evaluating", total=1.0)
            announce = job_announcer(console)
            result = evaluate(
                model,
                lm.tokenizer,
                config,
                data_dir=data_dir,
                cancelled=cancel.is_set,
                progress=lambda f, msg: (progress.update(task, completed=f, description=msg[:60]), announce(msg)),
                on_metric=lambda m: console.print(metric_line(m)),
            )
    except (DataNotFound, ValueError) as exc:  # DataError (an unreadable file too) is a ValueError
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return 2
    except (Cancelled, KeyboardInterrupt):
        console.print("[yellow]cancelled[/yellow]")
        return cancelled_exit_code(cancel)
    except RuntimeError as exc:  # torch.OutOfMemoryError and the libraries' "out of memory" RuntimeErrors
        from frankenlab.evals.devices import is_oom

        if not is_oom(exc):
            raise
        console.print(f"[bold red]error:[/bold red] {escape(eval_oom_message(lm, config))}")
        return 2
    finally:
        restore_sigint()
    console.print(results_table(result.metrics))
    for name in ("triviaqa_closed", "triviaqa_open"):
        wrong = [r for r in result.details.get(name, {}).get("records", []) if not r["correct"]]
        for r in wrong[: args.failures]:
            aliases = ", ".join(r["aliases"][:3]) + (" ..." if len(r["aliases"]) > 3 else "")
            console.print(
                f"[red]x[/red] {name} #{r['index']}: {escape(r['question'])}\n"
                f"    said {escape(repr(r['prediction']))}; expected {escape(aliases)}",
                highlight=False,
            )
    samples = result.details.get("samples")
    if samples:
        from frankenlab.evals.degeneration import describe

        for item in samples["items"]:
            console.print(
                f"[bold]{escape(repr(item['prompt']))}[/bold] -> {escape(repr(item['output']))}\n    [dim]"
                f"{describe(item['degeneration'])}[/dim]",
                highlight=False,
            )
    if args.json_out:
        from frankenlab.pipeline.atomic import atomic_write_text

        out = Path(args.json_out).expanduser()
        payload = {
            "model": lm.source.to_dict(),
            "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""),
            "seconds": time.perf_counter() - t0,
            "weights_origin": origin,
            "plan": args.plan,
            "config": _config_dict(config),
            "metrics": result.metrics,
            "details": result.details,
        }
        try:  # through the output-path guard: atomic, never through a symbolic link
            atomic_write_text(out, json.dumps(payload, indent=1, ensure_ascii=False))
        except OSError as exc:  # UnsafeOutputPath's strerror is its whole one-line message
            console.print(
                f"[bold red]error:[/bold red] cannot write {escape(str(out))} ({escape(exc.strerror or str(exc))})"
            )
            return 2
        console.print(f"results written to [bold]{escape(str(out))}[/bold]")
    return 0


def json_out_problem(json_out: str | None) -> str | None:
    """Why --json OUT cannot be written, checked before the model loads (None when it can)."""
    import os

    if not json_out:
        return None
    out = Path(json_out).expanduser()
    if out.is_symlink():  # the guard would refuse it after the evaluation: told now
        return (
            f"--json {json_out} is a symbolic link (to {os.readlink(out)}): results are never written through "
            "a link; remove it or choose another path"
        )
    if out.is_dir():
        return f"--json {json_out} is a folder: give a file name, e.g. --json {out / 'results.json'}"
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--json {json_out}: {parent} is a file, not a folder; choose another path"
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        return f"--json {json_out}: the folder {parent} is not writable; choose another path"
    return None


def _model_config(ref: str | None) -> dict | None:
    """The model's config.json without loading weights (None when it cannot be read: loading tells why)."""
    from frankenlab.pipeline.preflight import model_config

    return model_config(ref or "default")


def job_announcer(console):
    """Into a pipe the progress bar is not drawn: print one line as each job starts instead."""
    from frankenlab.tui.cli.console import piped

    last = [None]

    def announce(label: str) -> None:
        if piped(console) and label != last[0]:
            last[0] = label
            console.print(f"[dim]{escape(label)} ...[/dim]")

    return announce


def _plan_context(model, plan_text: str | None):
    """A context yielding the model to evaluate: the model itself, or the model under a layer plan."""
    import contextlib

    if not plan_text:
        return contextlib.nullcontext(model)
    from frankenlab.pipeline.loading import decoder_layers
    from frankenlab.pipeline.plans import LayerPlan, planned

    plan = LayerPlan.parse(plan_text, len(decoder_layers(model)))  # PlanError is a ValueError
    return planned(model, plan)


def _config_dict(config) -> dict:
    from frankenlab.evals.config import to_dict

    return to_dict(config)
