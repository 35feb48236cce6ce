"""The planner's validated plans against the uniform grid at one budget, measured (issue 27's proof).

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/frankenlab plan --budget 98752896 --validate 8 --out runs/plan
    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_plan_uniform \
        --plan-dir runs/plan --out runs/uniform [--uniform 0:none:3 2:none:3 ...] [--json FILE]

Printed, not asserted. The budget defaults to the weight bytes of Width 2:4 + GPTQ 4-bit g128 on every
decoder layer of the model (the thesis' smallest configuration without depth pruning), priced by
`pipeline.weight_bytes` as the planner prices its options. The uniform grid is Depth 0/2/4 x Width
none/1:2/2:4/3:4/1:8/4:8/1:16/8:16/12:16 x GPTQ bits 8/4/3 (g128); the configurations whose bytes lie
within 0.7x-1.0x of the budget are listed, and those named by `--uniform` (default: all of them) run
as one sweep (Depth k is the depth stage's own choice of layers; Width is WANDA; GPTQ as the stage
does it), evaluated like the plans: `wikitext2-concat-512`, the first `--eval-windows` windows.

The plans come from `frankenlab plan --validate K --out DIR` (its plan.json: the validated front points
with predicted and measured perplexity). A uniform configuration that is a plan the sensitivities can
price (Depth 0, its pattern and bits in the table's choice set) gets a predicted perplexity too: the
measured baseline x exp(sum of its per-layer deltas). The table: bytes, bytes / budget, measured and
predicted perplexity, for the plans and the uniform rows; then the best plan and the best uniform
configuration inside the band, Spearman (predicted vs measured) over the plans within +-10 % of the
budget, and the compact file of the chosen plan written from its saved model, its size against the
budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from benchmarks.common import load_average, machine_line

DEPTHS = (0, 2, 4)
PATTERNS = ("none", "1:2", "2:4", "3:4", "1:8", "4:8", "1:16", "8:16", "12:16")
BITS = (8, 4, 3)
GROUP = 128
BAND = (0.7, 1.0)


def uniform_bytes(shape, depth: int, pattern: str, bits: int) -> int:
    from frankenlab.pipeline.weight_bytes import embedding_weight_bytes, layer_weight_bytes

    layer = layer_weight_bytes(shape, pattern=None if pattern == "none" else pattern, bits=bits, group_size=GROUP)
    return embedding_weight_bytes(shape) + (shape.layers - depth) * layer


def thesis_budget(shape) -> int:
    return uniform_bytes(shape, 0, "2:4", 4)


def label(depth: int, pattern: str, bits: int) -> str:
    return f"{depth}:{pattern}:{bits}"


def parse_label(text: str) -> tuple[int, str, int]:
    try:
        d, p, b = text.split(":", 2) if text.count(":") == 2 else (None, None, None)
        if d is None:  # patterns hold a colon: depth:N:M:bits
            d, n, m, b = text.split(":")
            p = f"{n}:{m}"
        depth, bits = int(d), int(b)
    except ValueError:
        raise SystemExit(f"--uniform {text!r}: write DEPTH:PATTERN:BITS, e.g. 0:none:3 or 0:2:4:4") from None
    if depth not in DEPTHS or p not in PATTERNS or bits not in BITS:
        raise SystemExit(f"--uniform {text!r}: depth in {DEPTHS}, pattern in {PATTERNS}, bits in {BITS}")
    return depth, p, bits


def uniform_recipe(depth: int, pattern: str, bits: int, windows: int) -> dict:
    from frankenlab.pipeline.planner.recipe_out import EVAL_PROTOCOL

    stages: list[dict] = []
    if depth:
        stages.append({"kind": "depth", "k": depth})
    if pattern != "none":
        stages.append({"kind": "width", "pattern": pattern})
    stages.append({"kind": "gptq", "bits": bits, "group_size": GROUP})
    return {
        "name": f"uniform-{depth}-{pattern.replace(':', 'of')}-{bits}b",
        "description": f"Depth {depth} + Width {pattern} + GPTQ {bits}-bit g{GROUP}",
        "model": {"source": "default"},
        "evaluation": {"perplexity": [EVAL_PROTOCOL], "ppl_limit": windows, "samples": False},
        "stages": stages,
    }


def predicted(
    table, baseline_ppl: float | None, depth: int, pattern: str, bits: int, shifts: dict | None = None
) -> float | None:
    """baseline x exp(offset + sum of (delta + its interaction correction)) where the sensitivities can
    price the uniform plan, else None."""
    from frankenlab.pipeline.planner.options import option_name

    if table is None or baseline_ppl is None or depth:
        return None
    try:
        opt = option_name(pattern, bits)
    except ValueError:
        return None
    if opt not in table.options:
        return None
    shift = (shifts or {}).get(opt, 0.0)
    return baseline_ppl * math.exp(table.offset + sum(table.delta(i, opt) + shift for i in range(table.layers)))


def plan_table(plan: dict, digest: str, n_layers: int):
    """The sensitivity table the plan was searched on (its choice set, group size and reference), or None."""
    from frankenlab.pipeline.planner.options import SKIP, parse_option
    from frankenlab.pipeline.planner.sensitivity import load_cached

    opts = [parse_option(o) for o in plan.get("options", []) if o != SKIP]
    if not opts:
        return None
    return load_cached(
        digest,
        n_layers=n_layers,
        patterns=list(dict.fromkeys(o.pattern for o in opts)),
        bits=list(dict.fromkeys(o.bits for o in opts)),
        group_size=int(plan.get("group_size", GROUP)),
        around=(plan.get("sensitivities") or {}).get("around"),
    )


def run_uniform(rows: list[tuple[int, str, int]], out: Path, windows: int, data_dir) -> list[dict]:
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.plan_validation import session_figures
    from frankenlab.sessions.sweep import Configuration, Sweep, run_sweep
    from frankenlab.tui.cli.console import make_console
    from frankenlab.tui.cli.sweep import LineView

    recipes = [uniform_recipe(*r, windows) for r in rows]
    configs = [
        Configuration(i, {"uniform": label(*r)}, Recipe.from_dict(rec))
        for i, (r, rec) in enumerate(zip(rows, recipes, strict=True), 1)
    ]
    sweep = Sweep(name="uniform-in-band", base=recipes[0], axes=[], description="uniform configurations in the band")
    record = run_sweep(sweep, out, listener=LineView(make_console()), data_dir=data_dir, configs=configs)
    results = []
    for r, entry in zip(rows, record["configs"], strict=True):
        baseline, measured, weights = session_figures(out / entry["session"])
        results.append(
            {
                "label": label(*r),
                "status": entry.get("status"),
                "baseline_ppl": baseline,
                "measured_ppl": measured,
                "measured_bytes": weights,
            }
        )
    return results


def chosen_compact(plan: dict, plan_dir: Path, scratch: Path) -> dict | None:
    """The chosen plan's saved model (from its validation session) written in the compact form."""
    from frankenlab.pipeline.compact import save_compact
    from frankenlab.pipeline.loading import load_model
    from frankenlab.sessions import load_session

    chosen = (plan.get("chosen") or {}).get("choices")
    for p in (plan.get("validation") or {}).get("plans", []):
        if p.get("choices") == chosen and p.get("session") and Path(p["session"]).is_file():
            final = load_session(Path(p["session"])).stages[-1]
            folder = Path(p["session"]).parent / final.artifact if final.artifact else None  # relative to the session
            if folder is None or not folder.is_dir():
                return {"error": "the chosen plan's validation left no saved model"}
            lm = load_model(str(folder), device="cpu")
            c = save_compact(lm.model, scratch, dtype="bfloat16")  # dense floats as bf16: the planner's convention
            return {"file_bytes": c.file_bytes, "computed_bytes": c.computed_bytes, "path": str(c.path)}
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-dir", required=True, help="the --out folder of `frankenlab plan --validate K`")
    ap.add_argument("--out", required=True, help="sweep folder for the uniform configurations (reruns resume)")
    ap.add_argument("--uniform", nargs="*", default=None, help="DEPTH:PATTERN:BITS to run (default: all in band)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.planner.validate import spearman
    from frankenlab.pipeline.units import fmt_bytes
    from frankenlab.pipeline.weight_bytes import ModelShape

    plan_dir = Path(args.plan_dir)
    lm = load_model(None, device="cpu", dtype="float32")
    print(machine_line(lm))
    shape = ModelShape.from_config(lm.model.config.to_dict())
    budget = thesis_budget(shape)
    print(
        f"budget: {budget:,} bytes ({fmt_bytes(budget)}) = Width 2:4 + GPTQ 4-bit g{GROUP} on all {shape.layers} layers"
    )
    band = []
    for d in DEPTHS:
        for p in PATTERNS:
            for b in BITS:
                by = uniform_bytes(shape, d, p, b)
                if BAND[0] * budget <= by <= BAND[1] * budget:
                    band.append(((d, p, b), by))
    print(
        f"uniform configurations in {BAND[0]}x-{BAND[1]}x of the budget: {len(band)} of {len(DEPTHS) * len(PATTERNS) * len(BITS)}"
    )
    print("  " + ", ".join(f"{label(*r)} ({by / budget:.3f}x)" for r, by in band))
    wanted = [parse_label(u) for u in args.uniform] if args.uniform else [r for r, _ in band]
    outside = [label(*r) for r in wanted if r not in dict(band)]
    if outside:
        raise SystemExit(f"not in the band: {', '.join(outside)}")
    print(f"running {len(wanted)}: {', '.join(label(*r) for r in wanted)}; load {load_average()}", flush=True)
    uniform = run_uniform(wanted, Path(args.out), args.eval_windows, args.data_dir)

    plan = json.loads((plan_dir / "plan.json").read_text())  # read after the sweep: validation may have run beside it
    table = None
    try:
        from frankenlab.pipeline.planner.sensitivity import model_digest

        table = plan_table(plan, model_digest(lm.model), shape.layers)
    except Exception as exc:  # noqa: BLE001 - a missing table only costs the uniform predictions
        print(f"(no cached sensitivities for uniform predictions: {str(exc).splitlines()[0] if str(exc) else exc})")
    rows = []
    plans = (plan.get("validation") or {}).get("plans", [])
    chosen = (plan.get("chosen") or {}).get("choices")
    for i, p in enumerate(plans, 1):
        rows.append(
            {
                "what": f"plan p{i}" + (" (chosen)" if p.get("choices") == chosen else ""),
                "bytes": p["bytes"],
                "measured_ppl": p.get("measured_ppl"),
                "predicted_ppl": p.get("predicted_ppl"),
                "kind": "plan",
            }
        )
    by_label = {label(*r): by for r, by in band}
    for u in uniform:
        d, pat, b = parse_label(u["label"])
        rows.append(
            {
                "what": f"uniform Depth {d} + {pat} + {b}-bit",
                "bytes": by_label[u["label"]],
                "measured_ppl": u["measured_ppl"],
                "predicted_ppl": predicted(
                    table, u.get("baseline_ppl"), d, pat, b, (plan.get("sensitivities") or {}).get("corrections")
                ),
                "kind": "uniform",
            }
        )
    print("\n| configuration | weight bytes | x budget | measured ppl | predicted ppl |")
    print("|---|---|---|---|---|")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(
            f"| {r['what']} | {r['bytes']:,} | {r['bytes'] / budget:.3f} | {f(r['measured_ppl'])} | {f(r['predicted_ppl'])} |"
        )
    done_plans = [r for r in rows if r["kind"] == "plan" and r["measured_ppl"] is not None and r["bytes"] <= budget]
    done_uni = [r for r in rows if r["kind"] == "uniform" and r["measured_ppl"] is not None]
    best_plan = min(done_plans, key=lambda r: r["measured_ppl"], default=None)
    best_uni = min(done_uni, key=lambda r: r["measured_ppl"], default=None)
    near = [r for r in rows if r["kind"] == "plan" and r["measured_ppl"] and abs(r["bytes"] / budget - 1) <= 0.10]
    rho = spearman([r["predicted_ppl"] for r in near], [r["measured_ppl"] for r in near]) if len(near) > 1 else None
    figures = {"budget": budget, "rows": rows, "spearman_within_10pct": rho, "plans_within_10pct": len(near)}
    if best_plan and best_uni:
        win = best_plan["measured_ppl"] < best_uni["measured_ppl"]
        figures.update(best_plan=best_plan, best_uniform=best_uni, plan_wins=win)
        print(
            f"\nbest plan within the budget: {best_plan['what']} ppl {best_plan['measured_ppl']:.2f}; best uniform in band: "
            f"{best_uni['what']} ppl {best_uni['measured_ppl']:.2f} -> the plan {'wins' if win else 'does NOT win'}"
        )
    if rho is not None:
        print(f"Spearman (predicted vs measured ppl) over {len(near)} plans within +-10 % of the budget: {rho:.3f}")
    compact = chosen_compact(plan, plan_dir, Path(args.out) / "chosen-compact")
    figures["chosen_compact"] = compact
    if compact and "file_bytes" in compact:
        print(
            f"chosen plan's compact file: {compact['file_bytes']:,} bytes on disk ({compact['computed_bytes']:,} computed), "
            f"{compact['file_bytes'] / budget:.4f}x the budget -> {'within' if compact['file_bytes'] <= budget else 'OVER'}"
        )
    elif compact:
        print(f"chosen plan's compact file: {compact['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
