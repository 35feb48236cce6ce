"""What-if estimator benchmark: first answer and refined latency per toggle, single pass and naive, and a scan.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_whatif

Printed, not asserted (timings depend on the machine and its load; the load average is printed).
For every layer i, "skip layer i" is estimated three ways, interleaved so background load hits them
alike: progressively as the lab does it (first answer from the slice's first sample, then
refined to the whole slice; both latencies are printed), in one exact pass through the cache
(restart at layer i, no first answer: the estimator before progressive answers), and as a naive
full recompute (embedding, every kept layer, head, through the evaluation code). Then a fresh
estimator runs a full scan, coarse pass first.
Wall seconds are what a user waits; process CPU seconds (all threads) are printed beside them
because on a shared, loaded machine they move much less with other people's work.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import load_average, machine_line
from frankenlab.evals.head import HEAD_CHUNK_TOKENS, blocked_nll
from frankenlab.evals.perplexity import score_sequences
from frankenlab.pipeline.loading import load_model
from frankenlab.pipeline.plans import LayerPlan, planned
from frankenlab.pipeline.whatif import Estimate, WhatIfEstimator


def naive_estimate(est: WhatIfEstimator, plan: LayerPlan, cancelled=None) -> Estimate:
    """The same number without any reuse: the planned model's full forward through the evaluation code.

    The reference the estimator must agree with (tests/test_whatif.py imports it) and the
    baseline its speed is measured against.
    """
    est.prepare(cancelled)
    t0 = time.perf_counter()
    with planned(est.model, plan):
        nll, count = score_sequences(
            est.model, [(row, 0) for row in est.ids], batch_size=est.batch_size, cancelled=cancelled
        )
    ppl = math.exp(nll / count)
    return Estimate(
        ppl, ppl - est.baseline_ppl, time.perf_counter() - t0, 0, plan.to_text(), False, est.protocol, len(plan)
    )


@torch.inference_mode()
def head_seconds(est: WhatIfEstimator, blocked: bool = True, repeats: int = 3) -> float:
    """Median seconds of the output head and loss over the slice, in the estimator's chunks of tokens.

    blocked=True scores vocabulary blocks as the estimator does (`blocked_nll`); False builds the
    full (tokens, vocab) logits and takes cross-entropy, as the evaluation code does. The final
    norm (already applied to `last_hidden_state`) is left out of both: it costs next to nothing.
    """
    est.prepare()
    model, ids = est.model, est.ids
    head = model.lm_head
    hidden = model.model(input_ids=ids.to(head.weight.device), use_cache=False).last_hidden_state[:, :-1]
    labels = ids[:, 1:].to(hidden.device)  # (S, T-1): position t predicts token t+1
    rows = max(1, HEAD_CHUNK_TOKENS // ids.shape[1])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for r in range(0, hidden.shape[0], rows):
            x, y = hidden[r : r + rows].reshape(-1, hidden.shape[-1]), labels[r : r + rows].reshape(-1)  # (N, H), (N,)
            if blocked:
                blocked_nll(x, head.weight, head.bias, y)
            else:
                float(F.cross_entropy(head(x).float(), y, reduction="sum"))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", default=None, help="only these layers, e.g. 0,10,20,29 (default: all)")
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--no-edits", action="store_true", help="skip the interactive edit sequence")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); on a "
        "machine shared with others, 1 thread's CPU seconds are the least disturbed figure",
    )
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    print(machine_line(lm))
    print(f"load average at start: {load_average()}")
    kw = dict(data=args.data, samples=args.samples, seq_len=args.seq_len)
    est = WhatIfEstimator(lm.model, lm.tokenizer, **kw)
    t0 = time.perf_counter()
    est.prepare()
    prepare_s = time.perf_counter() - t0
    n = est.n_layers
    print(
        f"slice {est.protocol} ({est.tokens} scored tokens); baseline ppl {est.baseline_ppl:.3f}; "
        f"prepare {prepare_s:.2f} s; cache {est.cache_bytes / 2**20:.1f} MiB "
        f"(budget {est.max_cache_bytes / 2**20:.0f} MiB, stride {est.cache_report()['stride']})"
    )

    layers = range(n) if not args.layers else [int(x) for x in args.layers.split(",")]
    rows, cpu, prog = [], [], []
    for i in layers:
        plan = LayerPlan.without(n, [i])
        first = {}

        def on_partial(e, t=time.perf_counter, c=time.process_time, first=first):
            first.setdefault("est", e)
            first.setdefault("wall", t())
            first.setdefault("cpu", c())

        w0, c0 = time.perf_counter(), time.process_time()
        refined = est.estimate(plan, use_memo=False, record=False, on_partial=on_partial)
        w1, c1 = time.perf_counter(), time.process_time()
        fast = est.estimate(plan, use_memo=False, record=False)
        c2 = time.process_time()
        naive = naive_estimate(est, plan)
        c3 = time.process_time()
        part = first.get("est")
        prog.append(
            {
                "layer": i,
                "first_s": first.get("wall", w1) - w0,
                "first_cpu_s": first.get("cpu", c1) - c0,
                "refined_s": w1 - w0,
                "refined_cpu_s": c1 - c0,
                "first_ppl": part.ppl if part else refined.ppl,
                "first_stderr": part.stderr if part else None,
                "first_coverage": part.coverage_text if part else refined.coverage_text,
                "refined_ppl": refined.ppl,
                "single_pass_ppl": fast.ppl,
                "naive_ppl": naive.ppl,
            }
        )
        rows.append((i, fast.seconds, naive.seconds, fast.ppl, naive.ppl))
        cpu.append((c2 - c1, c3 - c2))
        p = prog[-1]
        se = f" +- {p['first_stderr']:.3f}" if p["first_stderr"] is not None else ""
        print(
            f"  skip {i:2d}: first answer {p['first_s']:5.2f} s (cpu {p['first_cpu_s']:5.2f}) ppl {p['first_ppl']:9.3f}"
            f"{se} on {p['first_coverage']}; refined {p['refined_s']:5.2f} s (cpu {p['refined_cpu_s']:5.2f}) "
            f"ppl {refined.ppl:9.3f}",
            flush=True,
        )
        print(
            f"           single pass {fast.seconds:5.2f} s (cpu {c2 - c1:5.2f}, restart {fast.restarted_at:2d}, "
            f"{fast.layers_run:2d} layers)  naive {naive.seconds:6.2f} s (cpu {c3 - c2:5.2f})  ppl {fast.ppl:9.3f} "
            f"(naive {naive.ppl:9.3f}, delta {fast.delta:+.3f})  load {load_average()}",
            flush=True,
        )
    cached_s = [r[1] for r in rows]
    naive_s = [r[2] for r in rows]
    cpu_c, cpu_n = statistics.median(c for c, _ in cpu), statistics.median(n_ for _, n_ in cpu)
    worst = max(abs(r[3] - r[4]) / r[4] for r in rows)
    worst_refined = max(abs(p["refined_ppl"] - p["naive_ppl"]) / p["naive_ppl"] for p in prog)
    med_c, med_n = statistics.median(cached_s), statistics.median(naive_s)
    med_first, med_refined = (
        statistics.median(p["first_s"] for p in prog),
        statistics.median(p["refined_s"] for p in prog),
    )
    med_first_cpu = statistics.median(p["first_cpu_s"] for p in prog)
    figures = {
        "protocol": est.protocol,
        "tokens": est.tokens,
        "layers": len(rows),
        "prepare_s": prepare_s,
        "cache_bytes": est.cache_bytes,
        "progressive": prog,
        "median_first_answer_s": med_first,
        "median_first_answer_cpu_s": med_first_cpu,
        "median_refined_s": med_refined,
        "max_relative_refined_vs_naive": worst_refined,
        "median_cached_s": med_c,
        "median_naive_s": med_n,
        "ratio_of_medians": med_n / med_c,
        "ratio_of_totals": sum(naive_s) / sum(cached_s),
        "mean_of_per_layer_ratios": statistics.mean(n_ / c for c, n_ in zip(cached_s, naive_s, strict=False)),
        "max_relative_ppl_difference": worst,
        "median_cached_cpu_s": cpu_c,
        "median_naive_cpu_s": cpu_n,
        "cpu_ratio_of_medians": cpu_n / cpu_c,
        "threads": torch.get_num_threads(),
    }
    print(
        f"progressive over {len(prog)} toggles: median first answer {med_first:.2f} s (cpu {med_first_cpu:.2f} s), "
        f"median refined {med_refined:.2f} s; refined vs naive max relative difference {worst_refined:.1e}"
    )
    print(
        f"single exact pass over {len(rows)} layers: median cached {med_c:.2f} s, median naive {med_n:.2f} s; "
        f"speed-up: mean over toggles of naive/cached {figures['mean_of_per_layer_ratios']:.2f}x, "
        f"ratio of medians {med_n / med_c:.2f}x, ratio of totals {figures['ratio_of_totals']:.2f}x; "
        f"max relative ppl difference {worst:.1e}"
    )
    print(
        f"process CPU time (all {torch.get_num_threads()} threads): median cached {cpu_c:.2f} s, "
        f"naive {cpu_n:.2f} s, ratio {cpu_n / cpu_c:.2f}x"
    )
    # what the time is made of: a toggle at layer i reruns the layers after i plus the output head
    head_s, full_head_s = head_seconds(est), head_seconds(est, blocked=False)
    per_layer = [(cached - head_s) / (n - 1 - i) for i, cached, *_ in rows if n - 1 - i >= 8]
    layer_s = max(1e-9, statistics.median(per_layer) if per_layer else (med_n - head_s) / max(1, n - 1))
    # credit the naive path with the estimator's faster head, to show what the cache alone buys
    fair = [(nv - max(0.0, full_head_s - head_s)) / c for _, c, nv, *_ in rows]
    figures.update(
        head_s=head_s,
        full_logits_head_s=full_head_s,
        layer_s=layer_s,
        mean_ratio_if_naive_had_blocked_head=statistics.mean(fair),
    )
    print(
        f"output head + loss {head_s:.2f} s in vocabulary blocks ({full_head_s:.2f} s as full logits + "
        f"cross-entropy, as the evaluation code does) = {head_s / layer_s:.1f} decoder layers of {layer_s:.3f} s. "
        f"Giving the naive path the blocked head too: mean over toggles {statistics.mean(fair):.2f}x"
    )

    # interactive editing: each toggle extends the previous plan further down the stack
    edits, skipped = [], []
    for i in () if args.no_edits else (8, 14, 20, 26):
        skipped.append(i)
        e = est.estimate(LayerPlan.without(n, skipped), use_memo=False)
        edits.append((tuple(skipped), e.seconds, e.restarted_at))
        print(f"  edit: skip {skipped} -> {e.seconds:.2f} s (restart at position {e.restarted_at})")
    figures["edit_sequence"] = [{"skipped": list(s), "seconds": t, "restarted_at": r} for s, t, r in edits]
    figures["cache_bytes_after_edits"] = est.cache_bytes

    if not args.no_scan:
        fresh = WhatIfEstimator(lm.model, lm.tokenizer, **kw)
        t0, c0 = time.perf_counter(), time.process_time()
        fresh.prepare()
        t1, c1 = time.perf_counter(), time.process_time()
        coarse_done = None
        scores = {}
        for i, e in fresh.scan(coarse_first=True):
            scores[i] = e.ppl
            if e.final and coarse_done is None:
                coarse_done = time.perf_counter() - t1
        t2, c2 = time.perf_counter(), time.process_time()
        figures.update(
            scan_prepare_s=t1 - t0,
            scan_s=t2 - t1,
            scan_total_s=t2 - t0,
            scan_cpu_s=c2 - c1,
            scan_coarse_grid_s=coarse_done,
        )
        least = sorted(scores, key=scores.get)[:5]
        print(
            f"full scan of {n} layers: coarse grid complete after {coarse_done or 0:.1f} s, exact after {t2 - t1:.1f} s "
            f"(+ {t1 - t0:.1f} s prepare; {c2 - c1:.1f} CPU s); least important: {least}"
        )
    print(f"load average at end: {load_average()}")
    figures["load_average_end"] = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
