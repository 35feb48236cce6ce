"""Running `frankenlab plan --validate` front points as a sweep and reading back what each measured.

`run_validation` turns the front points' recipes (`pipeline.planner.recipe_out.plan_recipe`) into one
sweep (`sessions.sweep.run_sweep` with explicit configurations: shared prefixes are computed once,
local or on Ray through the executor given) and `read_measured` reads every configuration's session:
the baseline and final perplexity and the final footprint, into `pipeline.planner.validate.Measured`
(which `calibrate` and `spearman` there compare with the predictions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from frankenlab.pipeline.planner.search import FrontPoint
from frankenlab.pipeline.planner.validate import Measured


# -- running front points as a sweep ----------------------------------------------------------------
def run_validation(
    points: Sequence[FrontPoint],
    recipes: Sequence[dict],
    out: str | Path,
    *,
    executor=None,
    listener=None,
    cancel=None,
    data_dir=None,
) -> tuple[list[Measured], dict]:
    """Run `recipes` (one per point) as a sweep into `out` and read back what each measured."""
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.pipeline.units import fmt_bytes
    from frankenlab.sessions.sweep import Configuration, Sweep, run_sweep

    configs = [
        Configuration(i, {"plan": f"p{i} {fmt_bytes(p.bytes)}"}, Recipe.from_dict(r))
        for i, (p, r) in enumerate(zip(points, recipes, strict=True), 1)
    ]
    sweep = Sweep(
        name="plan-validation",
        base=recipes[0],
        axes=[],
        description="front points of `frankenlab plan`, run to compare predicted and measured perplexity",
    )
    record = run_sweep(
        sweep, out, executor=executor, listener=listener, cancel=cancel, data_dir=data_dir, configs=configs
    )
    return read_measured(points, configs, Path(out), record), record


def read_measured(points, configs, out: Path, record: dict) -> list[Measured]:
    results = []
    for p, c, entry in zip(points, configs, record["configs"], strict=True):
        m = Measured(p, c.label, entry.get("status", "pending"), session=str(out / entry["session"]))
        m.baseline_ppl, m.measured_ppl, m.measured_bytes = session_figures(out / entry["session"])
        results.append(m)
    return results


def session_figures(path: Path) -> tuple[float | None, float | None, int | None]:
    """(baseline perplexity, final perplexity, final weight bytes with dense floats as bf16) of a sweep
    configuration's session; None for what it does not hold (no file, no stages, the last not done)."""
    from frankenlab.sessions import load_session

    if not path.is_file():
        return None, None, None
    session = load_session(path)
    if not session.stages:
        return None, None, None
    final = session.stages[-1]
    if final.status != "done":
        return _ppl(session.stages[0]), None, None
    weights = ((final.footprint or {}).get("what_if_weights_bytes") or {}).get("bf16")
    return _ppl(session.stages[0]), _ppl(final), weights


def _ppl(stage) -> float | None:
    metric = stage.metric("perplexity")
    value = metric.get("value") if metric else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
