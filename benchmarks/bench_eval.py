"""Evaluation speed: our `wikitext2-concat-512` against the matmul ceiling, a plain loop and lm-evaluation-harness.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_eval --windows 16
    (lm-evaluation-harness comes with the optional extra: pip install -e '.[bench]')

Printed, not asserted (timings depend on the machine and its load; the load average is printed).

The ceiling (`benchmarks/ceiling.py`): this CPU's measured fp32 matmul GFLOP/s on the model's own
weight shapes, divided by the model's forward FLOPs per token, is the most tokens per second any
evaluation could score; ours is printed as a fraction of it, by wall time and by CPU time. A plain
loop (full logits, `F.cross_entropy`) runs the same windows for an equal-work ratio.

What is compared, on exactly equal forward work. lm-eval's `wikitext` task downloads
`EleutherAI/wikitext_document_level` from the hub, which this machine cannot reach, and its task
machinery adds nothing to the speed of the model work. So the harness is driven one level down,
where that task spends its time: `HFLM` (`max_length=512`, the same `batch_size`, the same
in-memory model and tokenizer object) and its `loglikelihood_rolling` request on one document.
Its rolling windows score every token once: the first window predicts 511 tokens from an EOT
prefix, each later one 512, so a document of `W * 512 - 1` tokens is exactly `W` forward passes of
512 tokens. Ours scores `W` non-overlapping 512-token windows of the first `W * 512` tokens, 511
predictions each. Both sides therefore run `W` forward passes of 512 tokens on the same text
(WikiText-2 test rows joined with "\\n\\n", read from the same local file); the script counts the
harness' windows and says so if they differ. Timings are end to end from the text (tokenization
included) and interleaved (ours, theirs, ours, theirs) so background load hits both alike. Each
side prints what it scored: their `W * 512 - 1` tokens, our `W * 511`; the perplexities differ
slightly for that reason (different window boundaries) and are a sanity check, not a comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch

from benchmarks.ceiling import flops_per_token, matmul_rate, plain_loop, time_breakdown
from benchmarks.common import load_average, machine_line
from frankenlab.evals.data import load_texts
from frankenlab.evals.malloc import enabled as memory_tuning
from frankenlab.evals.perplexity import concat_windows, perplexity
from frankenlab.evals.qa import run_qa
from frankenlab.evals.side_by_side import EVAL_WORKERS_ENV, eval_workers
from frankenlab.pipeline.loading import load_model

SEQ_LEN = 512


def text_prefix(tokenizer, text: str, tokens: int) -> str:
    """The shortest prefix of `text` whose tokenization holds `tokens` tokens (cut at a token end)."""
    enc = tokenizer(text[: tokens * 12], return_offsets_mapping=True, verbose=False)
    if len(enc.input_ids) < tokens:
        raise ValueError("not enough text for that many tokens")
    return text[: enc.offset_mapping[tokens - 1][1]]


def ours(lm, text_file: Path, windows: int, batch_size: int) -> dict:
    c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    r = perplexity(lm.model, lm.tokenizer, f"{text_file}-concat-{SEQ_LEN}", limit=windows, batch_size=batch_size)
    cpu = time.process_time() - c0
    return {
        "ppl": r.value,
        "scored_tokens": r.tokens,
        "seconds": r.seconds,
        "cpu_seconds": cpu,
        "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
        "protocol": r.protocol,
        "tokens_per_s": r.tokens / r.seconds,
        "input_tokens_per_s": r.sequences * SEQ_LEN / r.seconds,
        "input_tokens_per_cpu_s": r.sequences * SEQ_LEN / cpu,
    }


def plain(lm, text: str, windows: int, batch_size: int) -> dict:
    """The textbook loop on our windows of the same text (tokenization included, as ours)."""
    w0, c0 = time.perf_counter(), time.process_time()
    seqs = [w for w, _ in concat_windows(lm.tokenizer, [text], SEQ_LEN, limit=windows)]
    nll, n = plain_loop(lm.model, seqs, batch_size)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {
        "ppl": math.exp(nll / n),
        "scored_tokens": n,
        "seconds": wall,
        "cpu_seconds": cpu,
        "input_tokens_per_s": len(seqs) * SEQ_LEN / wall,
        "input_tokens_per_cpu_s": len(seqs) * SEQ_LEN / cpu,
    }


def harness_windows(hf, text: str) -> int:
    """How many forward passes lm-eval's rolling loglikelihood makes on `text`."""
    from lm_eval import utils

    ids = hf.tok_encode(text)
    return len(
        list(
            utils.get_rolling_token_windows(
                token_list=ids, prefix_token=hf.prefix_token_id, max_seq_len=hf.max_length, context_len=1
            )
        )
    )


def harness(lm, text: str, batch_size: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    t0, c0 = time.perf_counter(), time.process_time()
    hf = HFLM(
        pretrained=lm.model, tokenizer=lm.tokenizer, max_length=SEQ_LEN, batch_size=batch_size, device=str(lm.device)
    )
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (ll,) = hf.loglikelihood_rolling([req], disable_tqdm=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(hf.tok_encode(text))
    return {
        "ppl": math.exp(-ll / n),
        "scored_tokens": n,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "tokens_per_s": n / seconds,
        "windows": harness_windows(hf, text),
    }


def print_breakdown(model, batch_size: int, best_cpu_gflops: float) -> dict:
    """Where one batch's time goes on one thread, and what that allows at most (see `time_breakdown`)."""
    b = time_breakdown(model, batch_size, SEQ_LEN)
    sec, flop = b["seconds"], b["flops"]
    ideal = (flop["gemm"] + flop["attention"]) / (best_cpu_gflops * 1e9)  # seconds at the best GEMM rate
    gemm_rate = flop["gemm"] / sec["gemm"] / 1e9
    attn_rate = flop["attention"] / sec["attention"] / 1e9 if sec["attention"] else float("nan")
    total = sum(sec.values())
    b.update(
        gemm_gflops=gemm_rate,
        attention_gflops=attn_rate,
        batch_fraction=ideal / b["wall_seconds"],
        bound_gemm_only=ideal / sec["gemm"],
        bound_attention_at_gemm_rate=ideal / (sec["gemm"] + flop["attention"] / (gemm_rate * 1e9)),
    )
    print(
        f"where a {batch_size}x{SEQ_LEN} batch's time goes on one thread (profiled, {total:.2f} s of operators, "
        f"{b['wall_seconds']:.2f} s wall unprofiled): GEMMs {sec['gemm']:.2f} s ({sec['gemm'] / total:.0%}) at "
        f"{gemm_rate:.0f} GFLOP/s = {gemm_rate / best_cpu_gflops:.2f} of the best GEMM; attention "
        f"{sec['attention']:.2f} s ({sec['attention'] / total:.0%}) at {attn_rate:.0f} GFLOP/s for "
        f"{flop['attention'] / (flop['gemm'] + flop['attention']):.0%} of the FLOPs; other {sec['other']:.2f} s "
        f"({sec['other'] / total:.0%}, no counted FLOPs)"
    )
    print(
        f"    this batch: {b['batch_fraction']:.2f} of the ceiling; at most {b['bound_attention_at_gemm_rate']:.2f} "
        f"with attention at the GEMMs' rate and everything else free, {b['bound_gemm_only']:.2f} with attention "
        "free as well (the GEMMs as they run)"
    )
    return b


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--windows", type=int, default=16, help="512-token windows scored per run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each (0: skip perplexity)")
    ap.add_argument("--qa", type=int, default=32, help="closed-book questions to time (0: skip)")
    ap.add_argument("--qa-open", type=int, default=16, help="open-book questions to time (0: skip)")
    ap.add_argument("--qa-batch-size", type=int, default=8)
    ap.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the one-thread profile of where a batch's time goes (CPU only)",
    )
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    lm = load_model(args.model)
    print(machine_line(lm))
    print(f"load average at start: {load_average()}")
    texts, source = load_texts("wikitext2")
    joined = "\n\n".join(texts)
    text = text_prefix(lm.tokenizer, joined, args.windows * SEQ_LEN)  # ours: W windows of 512
    their_text = text_prefix(lm.tokenizer, joined, args.windows * SEQ_LEN - 1)  # theirs: W rolling windows
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_eval_wikitext2_{os.getpid()}.txt"
    work.write_text(text, encoding="utf-8")  # the same characters for both, from the same file
    workers = eval_workers(lm.device, 2)
    print(
        f"evaluation: {workers} batch(es) side by side ({EVAL_WORKERS_ENV}), freed memory reused: "
        f"{'yes' if memory_tuning() else 'no'} (FRANKENLAB_MALLOC_TUNING)"
    )
    figures: dict = {
        "model": lm.source.name,
        "device": str(lm.device),
        "threads": torch.get_num_threads(),
        "eval_workers": workers,
        "malloc_tuning": memory_tuning(),
        "windows": args.windows,
        "batch_size": args.batch_size,
        "source": source,
        "runs": [],
    }
    try:
        import lm_eval

        figures["lm_eval"] = lm_eval.__version__ if hasattr(lm_eval, "__version__") else "installed"
    except ImportError:
        figures["lm_eval"] = None
        print("lm-evaluation-harness is not installed (pip install -e '.[bench]'): printing our figures only")
    flops = flops_per_token(lm.model, SEQ_LEN)
    figures["flops_per_token"] = flops
    print(
        f"model forward: {flops / 1e6:.1f} MFLOP per token at {SEQ_LEN}-token windows (linear layers, head, "
        "attention products at the mean causal context)"
    )
    rates = []
    try:
        if args.repeats:
            perplexity(lm.model, lm.tokenizer, f"{work}-concat-{SEQ_LEN}", limit=1)  # warm-up
        for rep in range(args.repeats):  # interleaved: ceiling, ours, plain, theirs
            rate = matmul_rate(lm.model)
            rates.append(rate)
            by = ", ".join(
                f"{k} {v['gflops_wall']:.1f} wall / {v['gflops_cpu']:.1f} per CPU-s" for k, v in rate["by_gemm"].items()
            )
            print(
                f"[{rep}] fp32 matmul {rate['gflops_wall']:.1f} GFLOP/s wall, {rate['gflops_cpu']:.1f} GFLOP per "
                f"CPU-second (best shape {rate['shape']}, {rate['gemm']}; {by}); load {load_average()}"
            )
            a = ours(lm, work, args.windows, args.batch_size)
            print(
                f"[{rep}] ours     {a['protocol']}: ppl {a['ppl']:.3f}, {a['scored_tokens']} scored tokens in "
                f"{a['seconds']:.1f} s (cpu {a['cpu_seconds']:.1f} s) = {a['input_tokens_per_s']:.0f} input tok/s, "
                f"{a['input_tokens_per_cpu_s']:.0f} per CPU-second; {a['minor_page_faults']} minor page faults"
            )
            run = {"ours": a, "matmul": rate}
            c = plain(lm, text, args.windows, args.batch_size)
            print(
                f"[{rep}] plain    full logits + cross-entropy: ppl {c['ppl']:.3f}, {c['scored_tokens']} scored "
                f"tokens in {c['seconds']:.1f} s (cpu {c['cpu_seconds']:.1f} s)"
            )
            run["plain"] = c
            if figures["lm_eval"]:
                b = harness(lm, their_text, args.batch_size)
                print(
                    f"[{rep}] lm_eval  HFLM.loglikelihood_rolling max_length=512: ppl {b['ppl']:.3f}, "
                    f"{b['scored_tokens']} scored tokens in {b['windows']} windows, {b['seconds']:.1f} s "
                    f"(cpu {b['cpu_seconds']:.1f} s)"
                )
                if b["windows"] != args.windows:
                    print(
                        f"    lm_eval ran {b['windows']} windows, ours {args.windows}: the timings are NOT on equal "
                        "work (a tokenizer whose prefix tokenizes differently); do not read the ratio"
                    )
                run["lm_eval"] = b
            figures["runs"].append(run)
    finally:
        work.unlink(missing_ok=True)
    runs = figures["runs"]
    if runs:
        tot = {
            k: (sum(r[k]["seconds"] for r in runs), sum(r[k]["cpu_seconds"] for r in runs))
            for k in ("ours", "plain", "lm_eval")
            if k in runs[0]
        }
        inputs = len(runs) * args.windows * SEQ_LEN
        ceiling_w = max(r["gflops_wall"] for r in rates) * 1e9 / flops  # tokens/s the matmuls allow
        ceiling_c = max(r["gflops_cpu"] for r in rates) * 1e9 / flops
        ours_w, ours_c = inputs / tot["ours"][0], inputs / tot["ours"][1]
        figures.update(
            ceiling_tokens_per_s=ceiling_w,
            ceiling_tokens_per_cpu_s=ceiling_c,
            ours_input_tokens_per_s=ours_w,
            ours_input_tokens_per_cpu_s=ours_c,
            ceiling_fraction_wall=ours_w / ceiling_w,
            ceiling_fraction_cpu=ours_c / ceiling_c,
        )
        print(
            f"ceiling (the best fp32 GEMM measured): {ceiling_w:.0f} tok/s wall, {ceiling_c:.0f} tok per CPU-second; "
            f"ours {ours_w:.0f} tok/s = {ours_w / ceiling_w:.2f} of the ceiling by wall time, {ours_c:.0f} per "
            f"CPU-second = {ours_c / ceiling_c:.2f} by CPU time"
        )
        if lm.device.type == "cpu" and not args.no_breakdown:
            figures["breakdown"] = print_breakdown(lm.model, args.batch_size, max(r["gflops_cpu"] for r in rates))
        default = [r["by_gemm"]["F.linear"] for r in rates if "F.linear" in r["by_gemm"]]
        if default:  # torch's own fp32 matmul (MKL F.linear on all threads): the usual yardstick
            lin_w = max(d["gflops_wall"] for d in default) * 1e9 / flops
            lin_c = max(d["gflops_cpu"] for d in default) * 1e9 / flops
            figures.update(
                default_matmul_tokens_per_s=lin_w,
                default_matmul_fraction_wall=ours_w / lin_w,
                default_matmul_fraction_cpu=ours_c / lin_c,
            )
            print(
                f"against torch's default fp32 matmul (F.linear on all threads, {lin_w:.0f} tok/s, {lin_c:.0f} per "
                f"CPU-second): {ours_w / lin_w:.2f} by wall time, {ours_c / lin_c:.2f} by CPU time"
            )
        for k in ("plain", "lm_eval"):
            if k in tot:
                figures[f"{k}_over_ours_wall"] = tot[k][0] / tot["ours"][0]
                figures[f"{k}_over_ours_cpu"] = tot[k][1] / tot["ours"][1]
                print(
                    f"equal work ({args.windows} windows of {SEQ_LEN} tokens x {len(runs)} runs): {k} took "
                    f"{tot[k][0] / tot['ours'][0]:.2f}x our wall time, {tot[k][1] / tot['ours'][1]:.2f}x our CPU time"
                )
        if "lm_eval" not in tot:
            print("lm_eval: not installed, column skipped (pip install -e '.[bench]')")
    for task, n in (("closed", args.qa), ("open", args.qa_open)):
        if not n:
            continue
        r = run_qa(lm.model, lm.tokenizer, task, n, batch_size=args.qa_batch_size)
        toks = sum(x["new_tokens"] for x in r.records)
        print(
            f"{r.protocol}: {r.n} questions in {r.seconds:.1f} s = {r.questions_per_second:.2f} q/s "
            f"({toks / r.seconds:.1f} new tok/s, batch {args.qa_batch_size}); accuracy {r.accuracy:.3f}, "
            f"EM {r.exact_match:.3f}"
        )
        figures[f"qa_{task}"] = {
            "protocol": r.protocol,
            "n": r.n,
            "seconds": r.seconds,
            "questions_per_s": r.questions_per_second,
            "new_tokens_per_s": toks / r.seconds,
            "accuracy": r.accuracy,
            "exact_match": r.exact_match,
        }
    print(f"load average at end: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
