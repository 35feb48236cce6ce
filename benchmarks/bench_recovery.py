"""Recovery benchmark (prints figures; never asserted): the full chain on the bundled model.

depth 2 + width 2:4 (WANDA) + LoRA (defaults, `--lora-steps` steps) + GPTQ (defaults: 4-bit,
group 128) + EoRA (defaults: rank 32, 64 C4 samples), through the runner, evaluating after every
stage. Prints seconds per stage, peak RSS after each stage, and perplexity before/after each
stage with its protocol; writes `bench_recovery.json` in the output.

The thesis' LoRA budget (8192 samples in batches of 8 = 1024 steps) takes hours on a CPU; the
default here runs a few steps. LoRA's speed (per step, per CPU-second, against a plain PEFT loop,
Trainer and the GEMM ceiling) is measured by `benchmarks.bench_lora`, not here.

Usage: python -m benchmarks.bench_recovery [--data-dir DIR] [--out DIR] [--lora-steps N]
       [--ppl-limit N] [--skip-eora] [--gptq-samples N] [--quant-only MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import peak_rss_gib

ROOT = Path(__file__).resolve().parent.parent


def recipe_text(args) -> str:
    gptq_extra = f"samples = {args.gptq_samples}\n" if args.gptq_samples else ""
    eora = "" if args.skip_eora else '[[stages]]\nkind = "eora"\n'
    prune_and_train = (
        ""
        if args.quant_only
        else f"""
[[stages]]
kind = "depth"
k = 2
[[stages]]
kind = "width"
pattern = "2:4"
[[stages]]
kind = "lora"
steps = {args.lora_steps}"""
    )
    return f"""
name = "bench-recovery"
model = "{args.quant_only or "default"}"
[calibration]
dataset = "c4"
samples = 32
seq_len = 128
[evaluation]
perplexity = ["{args.protocol}"]
ppl_limit = {args.ppl_limit}
samples = false
{prune_and_train}
[[stages]]
kind = "gptq"
{gptq_extra}{eora}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default=None)
    ap.add_argument("--lora-steps", type=int, default=8)
    ap.add_argument("--ppl-limit", type=int, default=16)
    ap.add_argument("--protocol", default="wikitext2-concat-512")
    ap.add_argument("--gptq-samples", type=int, default=0, help="0 = the recipe's calibration samples (32)")
    ap.add_argument("--skip-eora", action="store_true")
    ap.add_argument(
        "--quant-only",
        default="",
        metavar="MODEL_DIR",
        help="only GPTQ + EoRA (defaults) on a saved model, e.g. a previous run's stages/03-lora",
    )
    args = ap.parse_args()

    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import record_run

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-recovery-"))
    rss: dict[int, float] = {}
    t_start = time.perf_counter()

    def listener(e):
        if isinstance(e, ev.StageFinished):
            rss[e.stage] = peak_rss_gib()
            print(
                f"[{time.perf_counter() - t_start:7.1f}s] stage {e.stage} {e.kind} {e.status} in {e.seconds:.1f}s; "
                f"peak RSS {rss[e.stage]:.2f} GiB; {e.record.params_nonzero:,} nonzero params; "
                + ", ".join(f"{m['name']} {m['value']!s:.8}" for m in e.record.metrics),
                flush=True,
            )
        elif isinstance(e, ev.LogLine) and e.level in ("error", "warning"):
            print(f"  {e.level}: {e.message[-2000:]}", flush=True)
        elif isinstance(e, ev.LogLine):
            print(f"  {e.message}", flush=True)
        elif isinstance(e, (ev.RunFailed, ev.RunCancelled)):
            print(f"  run {'cancelled' if isinstance(e, ev.RunCancelled) else 'failed'}: {e.message}", flush=True)

    recipe = Recipe.loads(recipe_text(args))
    session = record_run(recipe, out, listener=listener, data_dir=args.data_dir)
    rows = []
    for st in session.stages:
        ppl = st.metric("perplexity")
        r = st.report or {}
        rows.append(
            {
                "stage": st.index,
                "kind": st.kind,
                "status": st.status,
                "seconds": st.seconds,
                "stage_seconds": r.get("stage_seconds"),
                "perplexity": ppl["value"] if ppl else None,
                "protocol": ppl.get("protocol") if ppl else None,
                "params": st.params_count,
                "params_nonzero": st.params_nonzero,
                "peak_rss_gib": rss.get(st.index),
                "lora_loss": [r.get("first_loss"), r.get("final_loss")] if st.kind == "lora" else None,
                "density": [r.get("density_before"), r.get("density_after")] if "density_after" in r else None,
                "zeros_kept_fraction": r.get("zeros_kept_fraction"),
                "gptq_seconds": r.get("seconds_quantize"),
                "disk_bytes": r.get("disk_bytes"),
                "eora_seconds": r.get("seconds_generate"),
                "adapter_bytes": r.get("adapter_bytes"),
                "sparsity": r.get("sparsity"),
            }
        )
    result = {
        "status": session.status,
        "threads": __import__("torch").get_num_threads(),
        "peak_rss_gib": peak_rss_gib(),
        "wall_seconds": time.perf_counter() - t_start,
        "lora_steps": args.lora_steps,
        "stages": rows,
        "out": str(out),
    }
    (out / "bench_recovery.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| stage | ppl | protocol | seconds | peak RSS GiB | notes |\n|---|---|---|---|---|---|")
    for r in rows:
        note = {
            "lora": f"loss {r['lora_loss']} (speed: python -m benchmarks.bench_lora)",
            "gptq": f"quantize {r['gptq_seconds'] or 0:.0f}s, {(r['disk_bytes'] or 0) / 2**20:.1f} MiB, "
            f"density {r['density']}, zeros kept {r['zeros_kept_fraction']}",
            "eora": f"generate {r['eora_seconds'] or 0:.0f}s, adapter {(r['adapter_bytes'] or 0) / 2**20:.1f} MiB",
        }.get(r["kind"], "")
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "-"
        print(
            f"| {r['stage']} {r['kind']} | {ppl} | {r['protocol']} | {r['seconds'] or 0:.1f} | "
            f"{r['peak_rss_gib'] or 0:.2f} | {note} |"
        )


if __name__ == "__main__":
    main()
