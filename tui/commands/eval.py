"""`frankenlab eval`: measure one model headless (perplexity, TriviaQA, generation samples).

    frankenlab eval --model M --ppl wikitext2-rows-512 --ppl wikitext2-concat-512 --limit 64
    frankenlab eval --model M --triviaqa-closed 200 --triviaqa-open 200 --samples --json out.json

With no task named it scores both WikiText-2 protocols. Every number is printed with its protocol;
`--json` writes metrics, per-question records and samples for later inspection.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tui.commands.common import ctrl_c_cancels

DEFAULT_PPL = ("wikitext2-rows-512", "wikitext2-concat-512")



def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, TriviaQA, generation samples",
                       description="Evaluate a model headless. Perplexity protocols: <data>-rows-<len> (each row a "
                                   "sequence, the thesis protocol) or <data>-concat-<len> (rows joined with blank "
                                   "lines, non-overlapping windows, GPTQ/WANDA); <data> is wikitext2, c4, wiki or "
                                   "a local .txt/.jsonl file.")
    p.add_argument("--model", dest="eval_model", default=None, metavar="MODEL",
                   help="HF folder, .gguf file, hub id, or omit for the bundled SmolLM2-135M-Instruct")
    p.add_argument("--ppl", action="append", default=None, metavar="PROTOCOL",
                   help="perplexity protocol, repeatable (default, when no task is named: "
                        + " and ".join(DEFAULT_PPL) + ")")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N rows/windows per protocol (default: the whole split)")
    p.add_argument("--stride", type=int, default=None, help="window stride for concat protocols (default: length)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="perplexity batch, in full-length sequences")
    p.add_argument("--triviaqa-closed", type=int, default=0, metavar="N", help="closed-book TriviaQA questions")
    p.add_argument("--triviaqa-open", type=int, default=0, metavar="N",
                   help="open-book questions (NQ-open with gold passages offline)")
    p.add_argument("--open-book", default="nq-open", choices=("nq-open", "triviaqa-rc"),
                   help="open-book source: NQ-open with gold passages (local data) or TriviaQA rc (hub)")
    p.add_argument("--qa-batch-size", type=int, default=8, metavar="B")
    p.add_argument("--failures", type=int, default=0, metavar="N",
                   help="print N wrongly answered questions per QA task (all are in --json)")
    p.add_argument("--seed", type=int, default=0, help="which questions are sampled")
    p.add_argument("--chat-template", action="store_true", help="wrap QA prompts in the model's chat template")
    p.add_argument("--samples", action="store_true", help="greedy generation samples on the fixed prompts")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the full results here")
    p.add_argument("--data-dir", dest="eval_data_dir", default=None, metavar="DIR",
                   help="evaluation data folder (or $FRANKENLAB_DATA_DIR)")
    p.set_defaults(func=main)


def results_table(metrics: list[dict]) -> Table:
    table = Table()
    table.add_column("metric", no_wrap=True)
    table.add_column("value", no_wrap=True)
    table.add_column("EM", no_wrap=True)  # strict exact match beside the thesis rule
    table.add_column("protocol", no_wrap=True)  # printed whole with every number
    table.add_column("work")  # the only column that wraps on a narrow terminal
    for m in metrics:
        secs = m.get("seconds") or 0.0
        if m["name"] == "perplexity":
            value, em = f"{m['value']:.3f}", "-"
            work = f"{m['tokens']:,} tok, {secs:.1f} s" + (f", {m['tokens'] / secs:.0f} tok/s" if secs else "")
        else:
            value, em = f"{m['value']:.3f}", f"{m['exact_match']:.3f}"
            work = f"{m['n']} q, {secs:.1f} s" + (f", {m['n'] / secs:.2f} q/s" if secs else "")
        table.add_row(m["name"], value, em, m.get("protocol", ""), work)
    return table


def main(args) -> int:
    from evals.data import DataNotFound
    from evals.perplexity import Cancelled
    from evals.suite import EvalConfig, evaluate
    from pipeline.config import RecipeError
    from pipeline.models import ModelLoadError, load_model

    console = Console()
    named = args.ppl or args.triviaqa_closed or args.triviaqa_open or args.samples
    try:
        config = EvalConfig(perplexity=tuple(args.ppl or (() if named else DEFAULT_PPL)),
                            ppl_limit=args.limit, ppl_stride=args.stride, batch_size=args.batch_size,
                            triviaqa_closed=args.triviaqa_closed, triviaqa_open=args.triviaqa_open,
                            qa_seed=args.seed, qa_batch_size=args.qa_batch_size, open_book=args.open_book,
                            chat_template=args.chat_template, samples=args.samples)
    except (RecipeError, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    data_dir = args.eval_data_dir or args.data_dir
    try:
        lm = load_model(args.eval_model or args.model, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    except ModelLoadError as exc:
        console.print(f"[bold red]model error:[/bold red] {exc}")
        return 2
    console.print(f"[dim]{lm.source.name} on {lm.device} as {str(lm.dtype).replace('torch.', '')}[/dim]")
    cancel, restore_sigint = ctrl_c_cancels(console, "stopping")
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("evaluating", total=1.0)
            result = evaluate(
                lm.model, lm.tokenizer, config, data_dir=data_dir, cancelled=cancel.is_set,
                progress=lambda f, msg: progress.update(task, completed=f, description=msg[:60]),
                on_metric=lambda m: console.print(f"  {m['name']} = {m['value']:.4g}  [dim]({m['protocol']})[/dim]"))
    except (DataNotFound, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    except (Cancelled, KeyboardInterrupt):
        console.print("[yellow]cancelled[/yellow]")
        return 130
    finally:
        restore_sigint()
    console.print(results_table(result.metrics))
    for name in ("triviaqa_closed", "triviaqa_open"):
        wrong = [r for r in result.details.get(name, {}).get("records", []) if not r["correct"]]
        for r in wrong[:args.failures]:
            aliases = ", ".join(r["aliases"][:3]) + (" ..." if len(r["aliases"]) > 3 else "")
            console.print(f"[red]x[/red] {name} #{r['index']}: {r['question']}\n    said {r['prediction']!r}; "
                          f"expected {aliases}", highlight=False)
    samples = result.details.get("samples")
    if samples:
        for item in samples["items"]:
            console.print(f"[bold]{item['prompt']!r}[/bold] -> {item['output']!r}", highlight=False)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": lm.source.to_dict(), "device": str(lm.device),
                   "dtype": str(lm.dtype).replace("torch.", ""), "seconds": time.perf_counter() - t0,
                   "config": _config_dict(config), "metrics": result.metrics, "details": result.details}
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
        tmp.replace(out)
        console.print(f"results written to [bold]{out}[/bold]")
    return 0


def _config_dict(config) -> dict:
    from pipeline.config import to_dict

    return to_dict(config)
