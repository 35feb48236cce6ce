"""Distillation against plain LoRA on equal CPU time: Width 2:4 and Depth 2, losses ce, kd and ce+kd.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_distill \
        --budget-cpu-s 600 --windows 32 --json /tmp/bench_distill.json

Printed, not asserted. For each configuration (`depth` k = 2; `width` 2:4, WANDA, the default
calibration) the pruning runs once through the runner (no evaluation, no saved folders); then for
each loss the LoRA stage's `run` trains a fresh copy of the pruned model with a real `StageContext`
that names the run's source model (the distillation teacher, as the runner passes it), merged as
in a recipe, and WikiText-2 perplexity (`wikitext2-concat-512`, the first `--windows` windows) is
measured before (the pruned model) and after.

The budget is CPU seconds of the whole LoRA stage (process CPU time of its `run`: tokenizing,
loading the teacher, the teacher's logits, training, merging): the teacher's cost is inside it.
The stage has no CPU-time stop, so the benchmark sets `steps`: for each configuration and loss it
first runs the stage twice with few steps (`--probe-steps`, default 1 and 3), fits CPU = fixed +
per_step x steps to the two, and takes steps = floor((budget - fixed) / per_step), at least 1. The
probe and the chosen steps are printed, and the stage's measured CPU seconds beside the budget.
Every LoRA run gets a fresh, empty cache folder (FRANKENLAB_CACHE), so a teacher top-k cache is
computed inside every budget and never reused from an earlier run.

The other LoRA settings are the stage's defaults except the training set (`--dataset`, default
wikitext2, WikiText-2 train), validation and checkpoints (off: work outside the budget's purpose;
`--stage-extras` keeps them), and `--batch`/`--seq-len` if given.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from benchmarks.common import load_average, machine_line

CONFIGS = {
    "width": ("Width 2:4 (WANDA)", '[[stages]]\nkind = "width"\npattern = "2:4"\n'),
    "depth": ("Depth 2", '[[stages]]\nkind = "depth"\nk = 2\n'),
}
PROTOCOL = "wikitext2-concat-512"


def stage_fields() -> set[str]:
    from frankenlab.pipeline.stages import lora

    return {f.name for f in fields(lora.Config)}


def lora_config(args, steps: int, loss: str):
    from frankenlab.pipeline.stages import lora

    names = stage_fields()
    extra = {} if args.stage_extras else {k: 0 for k in ("eval_every", "checkpoint_every") if k in names}
    if "loss" in names:
        extra["loss"] = loss
    elif loss != "ce":
        raise SystemExit("the LoRA stage has no loss option yet (distillation not in this tree): use --losses ce")
    if args.batch:
        extra["batch_size"] = args.batch
    if args.seq_len:
        extra["seq_len"] = args.seq_len
    return lora.Config(dataset=args.dataset, steps=steps, **extra)


def prune(args, key: str):
    """(loaded model pruned by configuration `key`, recipe) through the runner, nothing saved or evaluated."""
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.pipeline.runner import run_recipe

    model_ref = args.model or "default"
    recipe = Recipe.loads(
        f'name = "bench-distill-{key}"\nmodel = "{model_ref}"\n[evaluation]\nafter = "none"\n' + CONFIGS[key][1]
    )
    lm = load_model(args.model, dtype="float32")
    with tempfile.TemporaryDirectory(prefix="bench-distill-prune-") as out:
        result = run_recipe(recipe, out, loaded=lm, save_models=False, data_dir=args.data_dir, baseline=False)
    if result.status != "done":
        raise SystemExit(f"pruning ({CONFIGS[key][0]}) {result.status}: {result.message}")
    return lm, result.model, recipe


def context(lm, recipe, args, work: Path, marks: list):
    """A real StageContext naming the run's source model (the teacher); `marks` gets the process CPU
    time at the end of every training step."""
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline.context import StageContext

    def listener(e):
        if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss" and e.step is not None:
            marks.append(time.process_time())

    kw = {}
    if "source_model" in {f.name for f in fields(StageContext)}:
        m = recipe.model
        kw["source_model"] = {
            "source": m.source,
            "device": m.device,
            "dtype": m.dtype,
            "trust_remote_code": m.trust_remote_code,
        }
    return StageContext(
        lm.tokenizer,
        lm.device,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        work_dir=work,
        listener=listener,
        **kw,
    )


def train(pruned, lm, recipe, args, steps: int, loss: str) -> tuple[torch.nn.Module, float, float, dict]:
    """(trained model, stage CPU seconds, wall seconds, report) of one LoRA run on a copy of `pruned`,
    with a fresh cache folder (no teacher cache from an earlier run); the report gets
    `bench_cpu_s_per_step`, the CPU seconds between the ends of the first and the last step per step."""
    from frankenlab.pipeline.stages import lora

    config = lora_config(args, steps, loss)
    model = copy.deepcopy(pruned)
    marks: list[float] = []
    old = os.environ.get("FRANKENLAB_CACHE")
    with tempfile.TemporaryDirectory(prefix="bench-distill-lora-") as tmp:
        os.environ["FRANKENLAB_CACHE"] = str(Path(tmp) / "cache")
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            result = lora.run(model, context(lm, recipe, args, Path(tmp) / "stage", marks), config)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        finally:
            if old is None:
                os.environ.pop("FRANKENLAB_CACHE", None)
            else:
                os.environ["FRANKENLAB_CACHE"] = old
    report = dict(result.report)
    if len(marks) >= 2:
        report["bench_cpu_s_per_step"] = (marks[-1] - marks[0]) / (len(marks) - 1)
    return result.model, cpu, wall, report


def ppl(model, lm, args) -> float:
    from frankenlab.evals.perplexity import perplexity

    return perplexity(model, lm.tokenizer, PROTOCOL, data_dir=args.data_dir, limit=args.windows).value


def steps_for_budget(probe: list[tuple[int, float]], budget: float, in_run: float = 0.0) -> tuple[int, float, float]:
    """(steps, fixed CPU-s, CPU-s per step) from two probe runs [(steps, CPU-s), ...]: the slope
    between them (it holds a per-window teacher cache's cost too), but never below `in_run`, the
    CPU seconds per step measured inside the longer probe (a noisy slope must not buy extra steps)."""
    (s1, c1), (s2, c2) = probe
    per_step = max((c2 - c1) / (s2 - s1), in_run, 1e-9)
    fixed = max(0.0, c1 - per_step * s1)
    return max(1, math.floor((budget - fixed) / per_step)), fixed, per_step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    ap.add_argument("--budget-cpu-s", type=float, default=600.0, help="CPU seconds of the LoRA stage per run")
    ap.add_argument("--windows", type=int, default=32, help=f"{PROTOCOL} windows scored before and after")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--losses", nargs="+", default=["ce", "kd", "ce+kd"], choices=["ce", "kd", "ce+kd"])
    ap.add_argument("--probe-steps", nargs=2, type=int, default=[1, 3], metavar=("A", "B"))
    ap.add_argument("--dataset", default="wikitext2", help="the LoRA stage's training set")
    ap.add_argument("--batch", type=int, default=0, help="windows per step (0: the stage's default)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per window (0: the stage's default)")
    ap.add_argument("--stage-extras", action="store_true", help="keep the stage's validation and checkpoints")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    a, b = args.probe_steps
    if not 1 <= a < b:
        ap.error("--probe-steps takes two step counts A < B, A at least 1 (e.g. 1 3)")
    if args.budget_cpu_s <= 0 or args.windows < 1:
        ap.error("--budget-cpu-s must be positive and --windows at least 1")
    for loss in args.losses:
        lora_config(args, 1, loss)  # refuses kd where the stage has no loss option, before any work

    figures: dict = {
        "budget_cpu_s": args.budget_cpu_s,
        "windows": args.windows,
        "protocol": PROTOCOL,
        "budget_by": "probe: steps from two short runs per configuration and loss (the stage has no CPU-time stop)",
        "load_start": load_average(),
        "rows": [],
    }
    print(f"load average at start: {figures['load_start']}")
    for key in args.configs:
        label = CONFIGS[key][0]
        t0 = time.perf_counter()
        lm, pruned, recipe = prune(args, key)
        if key == args.configs[0]:
            print(machine_line(lm))
        before = ppl(pruned, lm, args)
        print(f"{label}: pruned in {time.perf_counter() - t0:.0f} s; {PROTOCOL}:first{args.windows} ppl {before:.2f}")
        for loss in args.losses:
            probe, in_run = [], 0.0
            for steps in (a, b):
                _, cpu, wall, rep = train(pruned, lm, recipe, args, steps, loss)
                probe.append((steps, cpu))
                in_run = rep.get("bench_cpu_s_per_step", in_run)
                print(f"  probe {loss}: {steps} step(s) in {cpu:.1f} CPU-s ({wall:.1f} s wall)", flush=True)
            steps, fixed, per_step = steps_for_budget(probe, args.budget_cpu_s, in_run)
            print(
                f"  {loss}: {fixed:.1f} CPU-s fixed + {per_step:.1f} CPU-s per step (slope of the probes, at least "
                f"the {in_run:.1f} CPU-s per step inside the longer one) -> {steps} steps for "
                f"{args.budget_cpu_s:.0f} CPU-s",
                flush=True,
            )
            model, cpu, wall, report = train(pruned, lm, recipe, args, steps, loss)
            after = ppl(model, lm, args)
            row = {
                "config": label,
                "loss": loss,
                "steps": steps,
                "cpu_seconds": cpu,
                "wall_seconds": wall,
                "ppl_before": before,
                "ppl_after": after,
                "probe": probe,
                "fixed_cpu_s": fixed,
                "cpu_s_per_step": per_step,
                "teacher": report.get("teacher"),
                "teacher_logits": report.get("teacher_logits"),
                "mixed_precision": report.get("mixed_precision"),
                "train_loss": [report.get("first_loss"), report.get("final_loss")],
                "load": load_average(),
            }
            figures["rows"].append(row)
            print(
                f"  {loss}: {steps} steps in {cpu:.1f} CPU-s ({wall:.1f} s wall), train loss "
                f"{row['train_loss'][0]:.3f} -> {row['train_loss'][1]:.3f}; ppl {before:.2f} -> {after:.2f}"
                + (f"; teacher {row['teacher_logits']}" if row["teacher_logits"] else "")
                + f"; load {row['load']}",
                flush=True,
            )
        del lm, pruned
    figures["load_end"] = load_average()
    print(f"\n{PROTOCOL}, first {args.windows} windows; LoRA budget {args.budget_cpu_s:.0f} CPU-s (probe-set steps)")
    print("| config | loss | steps | CPU-s | ppl before | ppl after |\n|---|---|---|---|---|---|")
    for r in figures["rows"]:
        print(
            f"| {r['config']} | {r['loss']} | {r['steps']} | {r['cpu_seconds']:.0f} | {r['ppl_before']:.2f} | "
            f"{r['ppl_after']:.2f} |"
        )
    print(f"load average at end: {figures['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return figures


if __name__ == "__main__":
    main()
