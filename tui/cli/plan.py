"""`frankenlab plan`: the best model that fits a weight budget, from per-layer choices.

    frankenlab plan [--model M] (--budget 60MiB | --budget 45% | --target NAME) [--choices patterns=none,1:8,2:4 bits=16,4]
                    [--around auto|OPTION] [--allow-protected] [--max-ppl X] [--validate K] [--out DIR]

Measures each layer's sensitivities (cached on disk: a second run reads them) around a reference (every
layer at one option: `--around auto` measures the uniform options that fit the budget and takes the best),
solves the multiple-
choice knapsack exactly (pipeline/planner/search.py), prints the predicted front (a table and a small
plot), the chosen plan's per-layer map and the verdict, and writes DIR/recipe.toml (the plan as a
recipe) and DIR/plan.json. `--validate K` runs the K front points nearest the budget (or spread over
budget +- `--validate-within`) as a sweep (DIR/validation; `--ray`/`--ray-address` as `frankenlab
sweep`), prints predicted against measured perplexity. Ctrl-C stops cleanly. The drawings are
`tui/plan_render.py`, shared with the lab's Plan pane.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.markup import escape

from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import make_console, piped
from frankenlab.tui.cli.signals import cancelled_exit_code, ctrl_c_cancels
from frankenlab.tui.plan_render import front_plot, front_table, layer_map, make_verdict, validation_table

FORMAT = "frankenlab-plan"


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="find the best per-layer plan (skip / N:M / bits) that fits a weight budget",
        description="Measure per-layer sensitivities (cached), solve the multiple-choice knapsack exactly, "
        "print the predicted front, the chosen plan and the verdict; write recipe.toml and plan.json.",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="weight bytes: 60MiB, 1.5GiB, 500MB, a number of bytes, or 45%% (of the model's dense bf16 weights)",
    )
    p.add_argument("--target", default=None, help="a memory target (pipeline/targets, e.g. siracusa, gtx1080ti)")
    p.add_argument("--targets-file", default=None, metavar="FILE", help="extra targets (TOML [targets.NAME])")
    p.add_argument(
        "--choices",
        nargs="+",
        default=[],
        metavar="KEY=VALUES",
        help="the per-layer choice set: patterns=none,1:8,1:4,2:4,8:16 bits=16,8,4,3 (the defaults; 16 = unquantized)",
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="GPTQ group size of every quantized option (default 128)"
    )
    p.add_argument(
        "--embed-format",
        default="bf16",
        choices=("bf16", "int8", "int4"),
        help="how the embeddings and head are counted (default bf16, what every stage leaves them at)",
    )
    p.add_argument(
        "--around",
        default="auto",
        metavar="OPTION",
        help="measure sensitivities around every layer at OPTION (e.g. 8:16/4), 'none/16' for the unmodified "
        "model, or 'auto' (the default): the uniform option within the budget with the lowest measured loss",
    )
    p.add_argument("--allow-protected", action="store_true", help="allow skipping the first 4 and last 2 layers")
    p.add_argument(
        "--max-ppl", type=float, default=None, help="the smallest plan whose predicted perplexity is at most X"
    )
    p.add_argument("--validate", type=int, default=0, metavar="K", help="run the K front points nearest the budget")
    p.add_argument(
        "--validate-within",
        default=None,
        metavar="PCT",
        help="validation: the K points spread evenly in bytes over budget +- PCT (e.g. 10%%), not the K nearest",
    )
    p.add_argument("--eval-windows", type=int, default=32, help="wikitext2-concat-512 windows scored (default 32)")
    p.add_argument("--ray", action="store_true", help="validation: run the jobs as Ray tasks on a local Ray instance")
    p.add_argument("--ray-address", default=None, help="validation: run the jobs on this Ray cluster")
    p.add_argument(
        "--method",
        default="gptq",
        choices=("gptq", "rtn"),
        help="how a quantized option is measured: gptq (as the stage does) or rtn (round to nearest, faster)",
    )
    p.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="sensitivity cache folder (default: the model cache)"
    )
    options.add(
        p,
        "model",
        "device",
        "dtype",
        "data_dir",
        "trust_remote_code",
        "out",
        notes={"out": "recipe.toml, plan.json and validation/ go there; nothing is written without it"},
    )
    p.set_defaults(func=main)


class Fail(Exception):
    """A one-line refusal (exit 2)."""


def parse_choices(items: list[str]) -> tuple[list[str], list[int]]:
    from frankenlab.pipeline.planner.options import OptionError, parse_choice_words

    try:
        patterns, bits, _ = parse_choice_words(
            items, "write patterns=none,1:8,2:4 and/or bits=16,8,4", what="--choices"
        )
    except OptionError as exc:
        raise Fail(str(exc)) from None
    return list(patterns), list(bits)


def check_around(text: str, patterns, bits) -> None:
    """--around: 'auto', or an option of the choice set (refused in one line before the model loads)."""
    from frankenlab.evals.errors import RecipeError
    from frankenlab.pipeline.planner.options import choice_set
    from frankenlab.pipeline.planner.sensitivity import reference_option

    if text.strip().lower() == "auto":
        return
    try:
        ref = reference_option(text)
    except RecipeError as exc:
        raise Fail(f"--around {text!r}: {exc}") from None
    options = choice_set(patterns, bits)
    if ref is not None and ref not in options:
        raise Fail(
            f"--around {ref}: not in the choice set ({', '.join(options[1:])}); add its pattern and bits to --choices"
        )


def parse_within(text: str | None) -> float | None:
    from frankenlab.evals.errors import RecipeError
    from frankenlab.pipeline.planner.budget import parse_share

    try:
        return parse_share(text)
    except RecipeError as exc:
        raise Fail(str(exc)) from None


class ProgressLine:
    """One updating line on a terminal; into a pipe, a line per tenth of the work."""

    def __init__(self, console):
        self.console = console
        self.tty = not piped(console)
        self.last = -1

    def __call__(self, fraction: float, message: str) -> None:
        text = f"sensitivities {fraction:6.1%}  {message}"
        if self.tty:
            self.console.file.write("\r" + text[: max(10, self.console.width - 1)].ljust(self.console.width - 1))
            self.console.file.flush()
            if fraction >= 1:
                self.console.file.write("\n")
        elif int(fraction * 10) < self.last:  # a new phase (the reference, then the entries) starts over
            self.last = int(fraction * 10)
            self.console.print(text, highlight=False, markup=False)
        elif int(fraction * 10) > self.last or fraction >= 1:
            self.last = int(fraction * 10)
            self.console.print(text, highlight=False, markup=False)


def main(args) -> int:
    console = make_console()
    err = make_console(stderr=True)
    cancel, restore = ctrl_c_cancels(console, "stopping the planner")
    try:
        return _main(args, console, cancel)
    except Fail as exc:
        err.print(f"[bold red]plan:[/bold red] {escape(str(exc))}", highlight=False)
        return 2
    finally:
        restore()


def _main(args, console, cancel) -> int:
    from frankenlab.evals.errors import RecipeError
    from frankenlab.pipeline.planner import budget as bd
    from frankenlab.pipeline.planner.options import valid_group_size
    from frankenlab.pipeline.preflight import model_config

    if args.validate < 0 or args.eval_windows < 1:
        raise Fail("--validate K needs K >= 0 and --eval-windows at least 1")
    if not valid_group_size(args.group_size):
        raise Fail(f"--group-size {args.group_size}: give -1 (one group per row) or a power of 2 such as 32, 64, 128")
    parse_within(args.validate_within)  # refused before anything loads
    if args.validate and not args.out:
        raise Fail("--validate runs a sweep: give --out DIR for its folder")
    if args.max_ppl is not None and not (args.max_ppl > 0 and math.isfinite(args.max_ppl)):
        raise Fail(f"--max-ppl {args.max_ppl}: give a positive perplexity")
    if args.budget is None and args.target is None and args.max_ppl is None:
        raise Fail("give a budget (--budget 60MiB, --budget 45% or --target NAME) or a quality bound (--max-ppl X)")
    if args.budget is not None and args.target is not None:
        raise Fail("give one budget: --budget or --target, not both")
    patterns, bits = parse_choices(args.choices)
    check_around(args.around, patterns, bits)
    model_ref = args.model or "default"
    cfg = model_config(model_ref)
    try:
        facts = bd.ModelFacts.from_config(cfg) if cfg else None
        budget = None
        if facts is not None and (args.budget is not None or args.target is not None):
            budget = bd.parse_budget(args.budget, args.target, facts, targets_file=args.targets_file)
        fixed = bd.embed_bytes(facts, args.embed_format, args.group_size) if facts else 0
    except RecipeError as exc:
        raise Fail(str(exc)) from None
    table, facts, budget, fixed, shifts = _sensitivities(args, console, cancel, patterns, bits, facts, budget, fixed)
    if table is None:
        return cancelled_exit_code(cancel)
    return _plan(args, console, cancel, table, facts, budget, fixed, model_ref, shifts)


def _sensitivities(args, console, cancel, patterns, bits, facts, budget, fixed):
    from frankenlab.evals.cancel import Cancelled
    from frankenlab.evals.errors import ModelLoadError, RecipeError
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.planner import budget as bd
    from frankenlab.pipeline.planner.sensitivity import measure_sensitivities, model_digest

    t0 = time.perf_counter()
    try:
        loaded = load_model(
            args.model,
            device=args.device or "auto",
            dtype=args.dtype or "auto",
            trust_remote_code=args.trust_remote_code,
        )
    except (ModelLoadError, OSError, ValueError) as exc:
        raise Fail(f"cannot load the model: {str(exc).strip().splitlines()[0]}") from None
    if facts is None:  # no config.json on disk (a GGUF): the loaded model's
        try:
            facts = bd.ModelFacts.from_config(loaded.model.config.to_dict())
            if args.budget is not None or args.target is not None:
                budget = bd.parse_budget(args.budget, args.target, facts, targets_file=args.targets_file)
            fixed = bd.embed_bytes(facts, args.embed_format, args.group_size)
        except RecipeError as exc:
            raise Fail(str(exc)) from None
    console.print(
        f"model {escape(str(loaded.source.path if hasattr(loaded.source, 'path') else args.model))}: "
        f"{facts.layers} layers, {facts.params / 1e6:.1f} M parameters; loaded in {time.perf_counter() - t0:.1f} s",
        highlight=False,
    )
    say = lambda m: console.print(escape(m), highlight=False)  # noqa: E731
    common = dict(
        patterns=patterns,
        bits=bits,
        group_size=args.group_size,
        method=args.method,
        cache_dir=args.cache_dir,
        cancel=cancel.is_set,
        log=say,
        data_dir=args.data_dir,
        digest=model_digest(loaded.model),
    )
    try:
        around = args.around
        if around.strip().lower() == "auto":
            around = pick_reference(loaded, facts, budget, fixed, args, console, common)
        table = measure_sensitivities(
            loaded.model, loaded.tokenizer, around=around, progress=ProgressLine(console), **common
        )
        shifts = interaction_corrections(loaded, table, facts, budget, fixed, args, console, common)
    except Cancelled:
        console.print("[yellow]cancelled: the sensitivities measured so far are kept in the cache[/yellow]")
        return None, facts, budget, fixed, {}
    except RecipeError as exc:
        raise Fail(str(exc)) from None
    around_text = (
        ""
        if table.around is None
        else f", around every layer at {table.around} (NLL {table.reference_nll:.4f}, ppl {math.exp(table.reference_nll):.4g})"
    )
    console.print(
        f"sensitivities: {table.layers} layers x {len(table.options)} options on {escape(table.windows)} "
        f"(statistics from {escape(table.calibration)}), baseline NLL {table.baseline_nll:.4f} "
        f"(ppl {math.exp(table.baseline_nll):.4g}){around_text}; {time.perf_counter() - t0:.1f} s so far",
        highlight=False,
    )
    return table, facts, budget, fixed, shifts


def interaction_corrections(loaded, table, facts, budget, fixed, args, console, common) -> dict[str, float]:
    """pipeline/planner/reference.py's corrections: each option a plan may mix in near the budget,
    measured with every layer at it (or read from the cache), against the sum of its one-layer deltas."""
    from frankenlab.pipeline.planner import reference
    from frankenlab.pipeline.units import fmt_bytes

    opts = reference.uniform_options(
        facts, None if budget is None else budget.bytes, fixed, table.options, args.group_size
    )
    opts = [(o, b) for o, b in opts if o != table.zero_option]
    if not opts:
        return {}

    def report(option, size, nll, seconds):
        console.print(
            f"  every layer at {option}: {fmt_bytes(size)}, NLL {nll:.4f} in {seconds:.1f} s", highlight=False
        )

    console.print(
        f"interactions: every layer at each of {', '.join(o for o, _ in opts)} (the sum of one-layer deltas misses them)"
    )
    uniform = reference.measure_uniform(loaded.model, loaded.tokenizer, opts, report=report, **common)
    shifts = reference.corrections(table, uniform)
    for option, c in shifts.items():
        console.print(f"  {option}: {c:+.4f} nats per layer at it", highlight=False)
    return shifts


def pick_reference(loaded, facts, budget, fixed, args, console, common) -> str | None:
    """--around auto (pipeline/planner/reference.py): each uniform option within the budget measured as a
    reference (or read from the cache), the lowest loss taken."""
    from frankenlab.pipeline.planner import reference
    from frankenlab.pipeline.planner.options import choice_set
    from frankenlab.pipeline.units import fmt_bytes

    options = choice_set(common["patterns"], common["bits"])
    cands = reference.candidates(facts, None if budget is None else budget.bytes, fixed, options, args.group_size)
    if not reference.needs_reference(cands):
        why = reference.why_none(cands, budget is not None)
        kept = None
        if budget is not None and not cands:
            keys = ("patterns", "bits", "group_size", "method", "cache_dir")
            kept = reference.any_cached(common["digest"], options, **{k: common[k] for k in keys})
        if kept is not None:
            console.print(
                f"reference: {kept}, whose table is stored ({why}: any measured table serves the verdict)",
                highlight=False,
            )
            return kept
        console.print(f"reference: the unmodified model ({why})", highlight=False)
        return None
    names = ", ".join(c for c, _ in cands)
    console.print(f"reference: measuring {len(cands)} uniform option(s) within the budget: {names}", highlight=False)

    def report(option, size, nll, seconds):
        console.print(
            f"  every layer at {option}: {fmt_bytes(size)}, NLL {nll:.4f} (ppl {math.exp(nll):.4g}) in {seconds:.1f} s",
            highlight=False,
        )

    best, _ = reference.pick(loaded.model, loaded.tokenizer, cands, report=report, **common)
    console.print(f"reference: every layer at {best} (lowest loss); each plan changes layers from it", highlight=False)
    return best


def search_table(table, facts, args, fixed: int, scale=None, shifts: dict[str, float] | None = None):
    from frankenlab.pipeline.planner.search import solve_table

    shift = (lambda o: shifts.get(o, 0.0)) if shifts else None
    return solve_table(
        table, facts, args.group_size, fixed, allow_protected=args.allow_protected, scale=scale, shift=shift
    )


def choose(front, budget, max_ppl):
    """The chosen point: least predicted loss within the budget, or the smallest within --max-ppl (and the budget)."""
    if max_ppl is not None:
        point = front.smallest_within(max_ppl)
        if point is not None and budget is not None and point.bytes > budget.plan_bytes:
            return None
        return point
    return front.best_within(budget.plan_bytes)


def _plan(args, console, cancel, table, facts, budget, fixed, model_ref, shifts=None) -> int:
    t0 = time.perf_counter()
    front = search_table(table, facts, args, fixed, shifts=shifts)
    console.print(
        f"search: {len(front.points)} front point(s) from {table.layers} layers x {len(table.options)} options "
        f"in {time.perf_counter() - t0:.2f} s (exact{'' if not front.bucket else ', bytes bucketed'})",
        highlight=False,
    )
    for note in front.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    chosen = choose(front, budget, args.max_ppl)
    console.print(front_table(front, budget, chosen))
    console.print(
        front_plot(front, None if budget is None else budget.bytes, chosen, width=60, height=8), soft_wrap=True
    )
    if chosen is not None:
        title = "chosen plan, per source layer:"
        console.print(layer_map(chosen, front.layers, table.options, title=title, described=True), soft_wrap=True)
    verdict = make_verdict(
        front,
        facts,
        budget,
        chosen,
        options=table.options,
        embed_format=args.embed_format,
        group_size=args.group_size,
        max_ppl=args.max_ppl,
    )
    for line in verdict["lines"]:
        console.print(escape(line), highlight=False, soft_wrap=True)
    plan = {
        "format": FORMAT,
        "version": 1,
        "model": model_ref,
        "budget": None if budget is None else budget.__dict__,
        "max_ppl": args.max_ppl,
        "embed_format": args.embed_format,
        "group_size": args.group_size,
        "allow_protected": args.allow_protected,
        "options": list(table.options),
        "sensitivities": {
            "windows": table.windows,
            "calibration": table.calibration,
            "around": table.around,
            "reference_nll": None if table.around is None else table.reference_nll,
            "corrections": dict(shifts or {}),
            "baseline_nll": table.baseline_nll,
            "method": table.method,
            "tokens": table.tokens,
        },
        "predicted_on": "the sensitivity windows (train text): ppl = exp(baseline NLL + offset + sum of deltas), "
        "offset = the reference's NLL - the baseline's (0 around the unmodified model)",
        "verdict": verdict,
        "chosen": None if chosen is None else chosen.to_dict(),
        "front": front.to_dict(),
    }
    if not args.out:
        if chosen is not None:
            console.print("no --out DIR: nothing written (give --out to get recipe.toml and plan.json)")
        return 0 if chosen is not None else 1
    out = Path(args.out)
    written = write(out, plan, chosen, args, model_ref, budget)
    if args.validate and chosen is not None:
        status = validate(
            args, console, cancel, table, facts, front, chosen, budget, fixed, plan, model_ref, out, shifts
        )
        if status:
            return status
    elif args.validate:
        console.print("nothing to validate: no plan meets the budget")
    if written:
        console.print(f"wrote {escape(str(written[0]))} and {escape(str(written[1]))}", highlight=False)
    else:
        console.print(f"wrote {escape(str(out / 'plan.json'))} (no plan fits: no recipe)", highlight=False)
    return 0 if chosen is not None else 1


def write(out: Path, plan: dict, chosen, args, model_ref, budget):
    import tomli_w

    from frankenlab.pipeline.atomic import atomic_write_text
    from frankenlab.pipeline.planner.recipe_out import PLAN_FILE, write_plan

    try:
        if chosen is None:
            out.mkdir(parents=True, exist_ok=True)
            import json

            atomic_write_text(out / PLAN_FILE, json.dumps(plan, indent=2, default=str) + "\n")
            return None
        recipe = user_recipe(chosen, args, model_ref, budget)
        return write_plan(out, tomli_w.dumps(recipe), plan)
    except OSError as exc:
        raise Fail(f"cannot write to {out}: {exc.strerror or exc}") from None


def model_extra(args) -> dict:
    extra = {k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k, None) not in (None, "auto")}
    if getattr(args, "trust_remote_code", False):
        extra["trust_remote_code"] = True
    return extra


def user_recipe(point, args, model_ref, budget, samples: bool = True) -> dict:
    from frankenlab.pipeline.planner.recipe_out import plan_recipe
    from frankenlab.pipeline.units import fmt_bytes

    what = f"within {budget.label}" if budget is not None else f"predicted ppl <= {args.max_ppl:g}"
    return plan_recipe(
        point.choices,
        model=model_ref,
        group_size=args.group_size,
        name=f"plan {fmt_bytes(point.bytes)}",
        description=f"frankenlab plan: {what}; {fmt_bytes(point.bytes)} of weights "
        f"(embeddings {args.embed_format}), predicted ppl {point.ppl:.4g} on the sensitivity windows",
        eval_windows=args.eval_windows,
        model_extra=model_extra(args),
        samples=samples,
    )


# -- validation -----------------------------------------------------------------------------------------
def best_measured(measured, budget, max_ppl: float | None = None):
    """The validated plan to keep: with `max_ppl`, the smallest whose measured perplexity is within it,
    else the lowest measured perplexity; either within the budget (what a plan may take:
    `Budget.plan_bytes`) when there is one. None when no measured plan qualifies."""
    fits = [m for m in measured if m.ok and (budget is None or m.point.bytes <= budget.plan_bytes)]
    if max_ppl is not None:
        fits = [m for m in fits if m.measured_ppl <= max_ppl]
        return min(fits, key=lambda m: (m.point.bytes, m.measured_ppl), default=None)
    return min(fits, key=lambda m: (m.measured_ppl, m.point.bytes), default=None)


def validate(
    args, console, cancel, table, facts, front, chosen, budget, fixed, plan, model_ref, out: Path, shifts=None
) -> int:
    from frankenlab.pipeline.planner.validate import VALIDATION_DIR, calibrate, spearman
    from frankenlab.pipeline.runlock import RunFolderBusy
    from frankenlab.pipeline.units import fmt_bytes
    from frankenlab.sessions.plan_validation import run_validation
    from frankenlab.tui.cli.sweep import LineView

    target = budget.bytes if budget is not None else chosen.bytes
    within = parse_within(args.validate_within)
    if within is None:
        points = front.nearest(target, args.validate, always=chosen)
    else:
        points = front.spread(target, args.validate, within, always=chosen)
    recipes = [user_recipe(p, args, model_ref, budget, samples=False) for p in points]
    executor = None
    if args.ray or args.ray_address:
        from frankenlab.sessions.sweep import RayExecutor

        try:
            executor = RayExecutor(address=args.ray_address, device=args.device or "auto")
        except RuntimeError as exc:
            raise Fail(str(exc)) from None
    where = "nearest" if within is None else f"spread over +-{within:.0%} of"
    console.print(f"[bold]validation[/bold]: {len(points)} front point(s) {where} {fmt_bytes(target)} as a sweep")

    def run(points, recipes):
        try:
            return run_validation(
                points,
                recipes,
                out / VALIDATION_DIR,
                executor=executor,
                listener=LineView(console),
                cancel=cancel,
                data_dir=args.data_dir,
            )
        except RunFolderBusy as exc:
            raise Fail(str(exc)) from None

    measured, record = run(points, recipes)
    extra = shifts or {}
    cal = calibrate(measured, lambda pos, o: table.delta(front.layers[pos], o) + extra.get(o, 0.0), offset=front.offset)
    if cal is not None:
        console.print(escape(cal.text), highlight=False)
        plan["calibration"] = cal.to_dict()
        if cal.off:
            refit = search_table(table, facts, args, fixed, scale=cal.scale, shifts=shifts)
            new = choose(refit, budget, None if args.max_ppl is None else args.max_ppl)
            fresh = new is not None and all(new.choices != p.choices for p in points)
            console.print(
                f"the additive model was off (RMS {cal.rms_before:.3f} > threshold): front re-ranked with the fit; "
                + (
                    "no plan fits with it"
                    if new is None
                    else ("its plan is measured too" if fresh else "its plan is one of those measured")
                )
                + ("" if new is None else f" (predicted ppl on the sensitivity windows {new.ppl:.4g})"),
                highlight=False,
            )
            plan["calibrated"] = {"front": refit.to_dict(), "chosen": None if new is None else new.to_dict()}
            if fresh and record.get("status") != "cancelled":
                points = [*points, new]
                recipes = [*recipes, user_recipe(new, args, model_ref, budget, samples=False)]
                measured, record = run(points, recipes)  # the finished nodes are reused
        else:
            console.print("the additive model is within the threshold: the front stays as predicted", highlight=False)
    best = best_measured(measured, budget, args.max_ppl)
    if best is not None and best.point.choices != chosen.choices:
        plan["chosen_predicted"] = plan["chosen"]
        plan["chosen"] = best.point.to_dict()
        chosen = best.point
    console.print(validation_table(measured, chosen))
    ok = [m for m in measured if m.ok]
    rho = spearman([m.predicted_ppl for m in ok], [m.measured_ppl for m in ok])
    console.print(f"Spearman rank correlation (predicted vs measured ppl, {len(ok)} plans): {rho:.3f}", highlight=False)
    if best is not None:
        what = "the smallest measured plan within --max-ppl" if args.max_ppl is not None else "the best measured plan"
        console.print(
            f"chosen: {best.label}, {what}{' within the budget' if budget is not None else ''} "
            f"(ppl {best.measured_ppl:.4g}"
            + (", the predicted choice)" if "chosen_predicted" not in plan else "; the predicted choice was another)"),
            highlight=False,
        )
    plan["validation"] = {
        "plans": [m.to_dict() for m in measured],
        "spearman": rho,
        "folder": str(out / VALIDATION_DIR),
    }
    write(out, plan, chosen, args, model_ref, budget)
    if record.get("status") == "cancelled":
        return cancelled_exit_code(cancel)
    return 0
