"""Coverage of the what-if first answer's interval: how often the refined value falls inside it.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_whatif_coverage --toggles 60

Draws random plans on the bundled model (seeded: single skips, pairs of skips, one layer
repeated), estimates each as the lab does (a first answer from the slice's first part with its
interval, then the exact value on the whole slice) and prints the measured coverage (refined
values inside the interval) against the level the interval claims (`pipeline.whatif.progressive`:
INTERVAL_LEVEL, INTERVAL_Z, INTERVAL_SCALE). Also printed: the coverage of the bare ± 1 standard
error the lab used to print, and the multiplier that would have reached the claimed level on this
draw (the calibration rule in progressive's docstring uses it on seed 0; a fresh seed re-measures).
Wall and process CPU seconds and the load average are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine_line
from frankenlab.pipeline.loading import load_model
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.whatif import WhatIfEstimator
from frankenlab.pipeline.whatif.progressive import (
    INTERVAL_LEVEL,
    INTERVAL_SCALE,
    INTERVAL_Z,
    interval_halfwidth,
)

KINDS = ("skip", "skip pair", "repeat")


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def draw_plans(n_layers: int, count: int, seed: int) -> list[tuple[str, LayerPlan]]:
    """`count` distinct plans, kinds in turn (skip, skip pair, repeat), layers drawn with `seed`.

    A kind whose plans are all drawn (30 single skips on the bundled model) gives way to the others."""
    rng = random.Random(seed)
    seen, out = set(), []
    limit = n_layers + n_layers * (n_layers - 1) // 2 + n_layers * 2  # every plan these kinds can make
    attempt = 0
    while len(out) < min(count, limit):
        kind = KINDS[attempt % len(KINDS)]
        attempt += 1
        counts = [1] * n_layers
        if kind == "skip":
            counts[rng.randrange(n_layers)] = 0
        elif kind == "skip pair":
            for i in rng.sample(range(n_layers), 2):
                counts[i] = 0
        else:
            counts[rng.randrange(n_layers)] = rng.choice((2, 3))
        plan = LayerPlan.from_counts(counts)
        if plan.order not in seen:
            seen.add(plan.order)
            out.append((kind, plan))
    return out


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by the nearest rank rule (the smallest value with at least q of them at or below it)."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)] if s else math.nan


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toggles", type=int, default=60, help="random plans to estimate (default 60)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the draw (0 is the calibration draw; default 1)")
    ap.add_argument("--model", default="default", help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.toggles < 1:
        ap.error("--toggles must be at least 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    w0, c0 = time.perf_counter(), time.process_time()
    lm = load_model(args.model)
    print(machine_line(lm))
    print(f"cpu: {cpu_model()}; load average at start: {load_average()}", flush=True)
    est = WhatIfEstimator(lm.model, lm.tokenizer, data=args.data, samples=args.samples, seq_len=args.seq_len)
    est.prepare()
    print(
        f"slice {est.protocol} ({est.tokens} scored tokens), baseline ppl {est.baseline_ppl:.3f}; first answers "
        f"from {est.coarse_rows} of {args.samples} samples; claimed level {INTERVAL_LEVEL:.0%} "
        f"(± {INTERVAL_Z} x {INTERVAL_SCALE} x standard error); seed {args.seed}",
        flush=True,
    )

    rows = []
    for kind, plan in draw_plans(est.n_layers, args.toggles, args.seed):
        first = []
        refined = est.estimate(plan, use_memo=False, record=False, on_partial=first.append)
        if not first or first[0].stderr is None or not math.isfinite(first[0].stderr):
            print(f"  {kind:9s} {plan.to_text()}: no first answer with an interval; left out", flush=True)
            continue
        f = first[0]
        half = interval_halfwidth(f.stderr)
        err = refined.ppl - f.ppl
        rows.append(
            {
                "kind": kind,
                "plan": plan.to_text(),
                "first_ppl": f.ppl,
                "stderr": f.stderr,
                "halfwidth": half,
                "refined_ppl": refined.ppl,
                "inside": abs(err) <= half,
                "inside_1se": abs(err) <= f.stderr,
                "ratio": abs(err) / (INTERVAL_Z * f.stderr) if f.stderr > 0 else math.inf,
            }
        )
        print(
            f"  {kind:9s} {plan.to_text():24s} first {f.ppl:9.3f} ± {half:7.3f}  refined {refined.ppl:9.3f}  "
            f"{'inside' if rows[-1]['inside'] else 'OUTSIDE'}  (|error| = {abs(err) / f.stderr:.2f} standard errors)",
            flush=True,
        )
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = len(rows)
    covered = sum(r["inside"] for r in rows)
    covered_1se = sum(r["inside_1se"] for r in rows)
    needed = quantile([r["ratio"] for r in rows], INTERVAL_LEVEL)
    by_kind = {k: (sum(r["inside"] for r in rows if r["kind"] == k), sum(r["kind"] == k for r in rows)) for k in KINDS}
    figures = {
        "seed": args.seed,
        "protocol": est.protocol,
        "claimed_level": INTERVAL_LEVEL,
        "z": INTERVAL_Z,
        "scale": INTERVAL_SCALE,
        "toggles": n,
        "covered": covered,
        "coverage": covered / n if n else math.nan,
        "covered_1se": covered_1se,
        "by_kind": by_kind,
        "scale_needed": needed,
        "wall_s": wall,
        "cpu_s": cpu,
        "threads": torch.get_num_threads(),
        "load_average_end": load_average(),
        "cpu_model": cpu_model(),
        "rows": rows,
    }
    verdict = "reaches" if n and covered / n >= INTERVAL_LEVEL else "falls short of"
    print(
        f"coverage: {covered}/{n} = {figures['coverage']:.1%} of refined values inside the first answer's interval "
        f"(± {INTERVAL_Z} x {INTERVAL_SCALE} x standard error), claimed {INTERVAL_LEVEL:.0%}: {verdict} it"
    )
    print("  by kind: " + ", ".join(f"{k} {c}/{t}" for k, (c, t) in by_kind.items()))
    print(f"  the bare ± 1 standard error covered {covered_1se}/{n} = {covered_1se / max(1, n):.1%}")
    print(
        f"  multiplier of ± {INTERVAL_Z} standard errors that reaches {INTERVAL_LEVEL:.0%} on this draw: {needed:.2f}"
    )
    print(
        f"wall {wall:.1f} s, process CPU {cpu:.1f} s ({torch.get_num_threads()} threads); "
        f"load average at end: {figures['load_average_end']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
