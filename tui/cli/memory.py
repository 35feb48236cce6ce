"""`frankenlab memory --model M [--target NAME]`: a model's storage footprint against hardware budgets.

Prints bytes per component (embeddings counted once when tied, attention, MLP, norms, adapters,
KV cache and decode activations at --context), the storage formats found in the model, what-if
columns for planned stages (--what-if 2:4+int4-g128), and for each target whether it fits or by
what factor it misses. `--compact DIR` also writes the compact safetensors form and prints its
measured size beside the computed one.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import make_console


def register(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="footprint of a model by storage format, against hardware budgets",
        description="Bytes per component computed from how each tensor is stored (dense, N:M "
        "sparse with index metadata, int4 with group scales and zeros, adapters), "
        "the KV cache at --context, and fits / misses-by verdicts for memory targets. --model also "
        "opens a compact folder or .safetensors file (see --compact).",
    )
    options.add(p, "model", "device", "dtype")
    p.add_argument(
        "--target",
        action="append",
        default=None,
        help="budget to compare with (repeatable; default: all). See --list-targets",
    )
    p.add_argument(
        "--targets-file",
        action="append",
        default=[],
        help='TOML file with [targets.NAME] tables (memory = "8 GiB", or weights + activations)',
    )
    p.add_argument("--list-targets", action="store_true", help="list the known targets and exit")
    p.add_argument(
        "--what-if",
        action="append",
        default=[],
        metavar="SPEC",
        help="also price the model as if a stage had run: 2:4, int4-g128, bf16, or combined "
        "2:4+int4-g128 (repeatable; N:M = N pruned of every M)",
    )
    p.add_argument("--context", type=int, default=512, help="KV cache length in tokens (default 512)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once (default 1)")
    p.add_argument(
        "--compact",
        default=None,
        metavar="DIR",
        help="write the compact safetensors form to DIR and report its size on disk",
    )
    p.add_argument("--compact-dtype", default=None, help="cast dense floats when writing --compact (e.g. bfloat16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=main)


def load_for_memory(ref: str | None, device: str, dtype: str):
    """A torch model from any source the lab knows, including compact folders and (through
    `load_model`) GPTQ folders, gptq / eora stage folders."""
    from frankenlab.pipeline.compact import COMPACT_FILE, load_compact
    from frankenlab.pipeline.loading import load_model

    path = Path(ref).expanduser() if ref else None
    if path is not None and (path.suffix == ".safetensors" and path.is_file() or (path / COMPACT_FILE).is_file()):
        return load_compact(path, device="cpu" if device == "auto" else device), str(path)
    loaded = load_model(ref, device="cpu" if device == "auto" else device, dtype=dtype)
    return loaded.model, loaded.source.name


def main(args) -> int:
    from frankenlab.evals.errors import ModelLoadError, RecipeError
    from frankenlab.pipeline.targets import load_targets

    console = make_console()
    try:
        targets = load_targets(*args.targets_file)
        if args.list_targets:
            console.print(targets_table(targets))
            return 0
        names = args.target or sorted(targets)
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise RecipeError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(sorted(targets))}")
        if args.context < 1 or args.batch < 1:
            raise RecipeError("--context and --batch must be at least 1")
        from frankenlab.pipeline.footprint import Assume, footprint

        assumes = [Assume.parse(s) for s in args.what_if]
        problem = compact_out_problem(args.compact)  # told before the model loads
        if problem:
            raise RecipeError(problem)
        with contextlib.redirect_stdout(sys.stderr):  # loaders print (gptqmodel dumps configs); keep --json clean
            model, name = load_for_memory(args.model, args.device, args.dtype)
        base = footprint(model, context=args.context, batch=args.batch)
        columns = [("as is", base)] + [(a.label, base.assuming(a)) for a in assumes]
        compact = None
        if args.compact:
            from frankenlab.pipeline.compact import save_compact

            compact = save_compact(model, args.compact, dtype=args.compact_dtype)
    except (RecipeError, ModelLoadError) as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return 2
    except OSError as exc:  # writing --compact: a full disk, a folder we may not write
        console.print(f"[bold red]error:[/bold red] cannot write {escape(str(args.compact))} ({exc.strerror or exc})")
        return 2
    chosen = {n: targets[n] for n in names}
    if args.json:
        out = {
            "model": name,
            "footprints": {label: fp.to_dict() for label, fp in columns},
            "targets": {
                n: {
                    "target": t.to_dict(),
                    "verdicts": {label: [c.to_dict() for c in t.verdict(fp)] for label, fp in columns},
                }
                for n, t in chosen.items()
            },
        }
        if compact is not None:
            out["compact"] = compact.to_dict()
        print(json.dumps(out, indent=2, default=str))
        return 0
    console.print(
        f"[bold]{escape(name)}[/bold]: KV cache at {args.context} tokens x batch {args.batch}; N:M = N pruned of every M"
    )
    console.print(components_table(columns))
    for label, fp in columns:
        console.print(
            f"[dim]{label}: formats " + ", ".join(f"{k} x{v}" for k, v in sorted(fp.formats().items())) + "[/dim]"
        )
    for note in dict.fromkeys(base.notes):
        console.print(f"[dim]note: {escape(note)}[/dim]")
    console.print(verdict_table(chosen, columns))
    if compact is not None:
        from frankenlab.pipeline.units import fmt_bytes

        console.print(
            f"compact form written to [bold]{compact.path}[/bold]: {fmt_bytes(compact.file_bytes)} on disk, "
            f"{fmt_bytes(compact.computed_bytes)} computed ({compact.ratio - 1:+.2%})"
        )
    return 0


def compact_out_problem(compact: str | None) -> str | None:
    """Why --compact DIR cannot be written, checked before the model loads (None when it can)."""
    import os

    if not compact:
        return None
    out = Path(compact).expanduser()
    if out.exists() and not out.is_dir():
        return f"--compact {compact} is a file: give a folder (the compact form is written to DIR/model.compact.safetensors)"
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--compact {compact}: {parent} is a file, not a folder; choose another folder"
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        return f"--compact {compact}: the folder {parent} is not writable; choose another folder"
    return None


def components_table(columns) -> Table:
    from frankenlab.pipeline.footprint import RUNTIME_COMPONENTS, WEIGHT_COMPONENTS
    from frankenlab.pipeline.units import fmt_bytes

    table = Table(title="footprint by component")
    table.add_column("component")
    for label, _ in columns:
        table.add_column(label, justify="right")
    comps = [fp.components() for _, fp in columns]
    for c in WEIGHT_COMPONENTS:
        if any(cc.get(c) for cc in comps):
            table.add_row(c, *(fmt_bytes(cc.get(c, 0)) for cc in comps))
    table.add_row("[bold]weights[/bold]", *(f"[bold]{fmt_bytes(fp.weights_bytes)}[/bold]" for _, fp in columns))
    parts = [fp.overhead() for _, fp in columns]
    for part, label in (("index", "  index bits"), ("scales", "  scales+zeros")):
        if any(p.get(part) for p in parts):
            table.add_row(f"[dim]{label}[/dim]", *(f"[dim]{fmt_bytes(p.get(part, 0))}[/dim]" for p in parts))
    for c in RUNTIME_COMPONENTS:
        table.add_row(c, *(fmt_bytes(cc.get(c, 0)) for cc in comps))
    table.add_row("[bold]total[/bold]", *(f"[bold]{fmt_bytes(fp.total_bytes)}[/bold]" for _, fp in columns))
    return table


def verdict_table(targets, columns) -> Table:
    from frankenlab.pipeline.units import fmt_bytes

    table = Table(title="budgets (W: weights vs weight memory, A: KV cache + activations vs activation memory)")
    table.add_column("target")
    table.add_column("budget")
    for label, _ in columns:
        table.add_column(label)
    for name, t in targets.items():
        budget = (
            fmt_bytes(t.memory)
            if t.memory
            else f"W {fmt_bytes(t.weights)}" + (f"\nA {fmt_bytes(t.activations)}" if t.activations else "")
        )
        cells = []
        for _, fp in columns:
            parts = []
            for c in t.verdict(fp):
                style = "green" if c.fits else "red"
                prefix = {"weights": "W ", "activations": "A "}.get(c.memory, "")
                parts.append(f"{prefix}[{style}]{c.short}[/{style}]")
            cells.append("\n".join(parts))
        table.add_row(name, budget, *cells)
    return table


def targets_table(targets) -> Table:
    from frankenlab.pipeline.units import fmt_bytes

    table = Table("name", "label", "memory", "weights", "activations", "l1", "from")
    for n, t in sorted(targets.items()):
        table.add_row(
            n, t.label, *(fmt_bytes(v) if v else "-" for v in (t.memory, t.weights, t.activations, t.l1)), t.source
        )
    return table
