"""LoRA training speed: our stage against a plain PEFT loop and `transformers.Trainer`, on equal work.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_lora --steps 32 --batch 8 \
        --seq-len 256 --json /tmp/bench_lora.json

Printed, not asserted (timings move with the machine and its load; the load average is printed).

Three ways to train the same adapter (rank, alpha, dropout, targets, lr and its schedule, seed) on
the same packed windows in the same order, `--steps` optimizer steps of `--batch` windows of
`--seq-len` tokens each:

- **ours**: the LoRA stage's `run` with a real `StageContext` (whatever the stage does today:
  precision, loss, data order), adapter not merged and not saved (neither is timed anyway);
- **plain**: the loop a user writes from PEFT's docs: `get_peft_model`, `torch.optim.AdamW`, fp32,
  `model(input_ids, labels=input_ids).loss.backward()`, the stage's lr schedule (linear decay to
  10 %, `transformers.get_wsd_schedule`);
- **trainer**: `transformers.Trainer` on the PEFT model, defaults except what makes the settings
  equal: the same schedule (`warmup_stable_decay`, linear, min ratio 0.1), no weight decay, no
  gradient clipping (the stage clips nothing), sequential sampling of the windows in the stage's
  order, logging every step. Its optimizer is Trainer's default (`adamw_torch_fused`).

Timing: wall and process CPU seconds at the end of every step (the stage's `lora_loss` metric,
Trainer's `on_step_end`, the plain loop's own line); seconds per step are from the end of step 1 to
the end of the last step, so setup and the first step (warm-up) count for nobody. Runs are
interleaved (ours, plain, trainer, then again) so background load hits all alike.

Peak memory: the process's resident high-water mark (VmHWM), reset before each run by writing 5
to /proc/self/clear_refs; where that is refused, RSS sampled every 10 ms. Either way it includes
the base model that all three hold the same way.

Ceiling: FLOPs of one training token = forward (linears, head, attention products, as
`benchmarks/ceiling.py` counts them) + the backward through the activations (every linear's input
gradient except the first layer's q/k/v inputs, the head's, the attention products twice) + the
adapters (forward, both gradients, their input gradient: 6 r (in + out) per adapted linear). The
frozen weights' gradients are not work LoRA needs, so they are not counted. Against the best fp32
GEMM rate measured in the same run (`ceiling.matmul_rate`: MKL and oneDNN, per CPU-second) and,
where torch computes bf16 matmuls, the best bf16 `F.linear` rate on the same shapes.

Where the time goes: torch.profiler over step 2 of a 2-step run of ours and of the plain loop,
operators' self CPU time grouped as GEMMs, attention, head/cross-entropy (the head's GEMMs,
log-softmax, NLL, any op on vocabulary-sized tensors), optimizer (everything under
`Optimizer.step`/`zero_grad`), and element-wise/other (norms, rotary, dropout, adds, copies).

The instruments (CPU flags, step clocks, peak memory, the FLOP count, the profile grouping) are
`benchmarks/lora_measure.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ceiling import matmul_rate
from benchmarks.common import load_average, machine_line
from benchmarks.lora_measure import (
    PeakRSS,
    StepClock,
    bf16_rate,
    cpu_capability,
    group_profile,
    train_flops_per_token,
)

IMPLEMENTATIONS = ("ours", "plain", "trainer")


# -- the same work for everybody -------------------------------------------------------------------
# the stage's extra work the other two never do: validation on held-out windows, checkpoints
NO_EXTRAS = {"eval_every": 0, "checkpoint_every": 0}


def stage_config(args, steps: int):
    """The stage's config for this work; validation and checkpoints off unless --stage-extras
    (fields the stage does not have are left out)."""
    from dataclasses import fields

    from frankenlab.pipeline.stages import lora

    names = {f.name for f in fields(lora.Config)}
    extras = {} if args.stage_extras else {k: v for k, v in NO_EXTRAS.items() if k in names}
    return lora.Config(
        **extras,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(args.targets),
        dataset=args.dataset,
        steps=steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        merge=False,
    )


def step_batches(lm, args, data_dir) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stage's windows and, per step, the indices it trains on (its data order, per seed)."""
    from frankenlab.pipeline.stages import lora

    config = stage_config(args, args.steps)
    windows, _ = lora.training_windows(lm.tokenizer, config, data_dir, needed=args.steps * args.batch)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n = len(order)
    batches = [order[[(s * args.batch + i) % n for i in range(args.batch)]] for s in range(args.steps)]
    return windows, batches


def peft_model_of(base, args):
    from frankenlab.pipeline.lora_adapters import add_adapter

    return add_adapter(
        copy.deepcopy(base),
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        seed=args.seed,
    )


# -- the three ways --------------------------------------------------------------------------------
def run_ours(base, lm, args, data_dir, steps: int, clock: StepClock) -> dict:
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline.context import StageContext
    from frankenlab.pipeline.stages import lora

    def listener(e):
        if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss" and e.step is not None:
            clock.mark(e.value)

    ctx = StageContext(lm.tokenizer, lm.device, data_dir=Path(data_dir) if data_dir else None, listener=listener)
    result = lora.run(copy.deepcopy(base), ctx, stage_config(args, steps))
    report = result.report
    return {
        "mixed_precision": report.get("mixed_precision"),
        "loss": report.get("loss"),
        "speed_ups": report.get("speed_ups"),
    }


def run_plain(base, lm, args, windows, batches, clock: StepClock) -> dict:
    from transformers import get_wsd_schedule

    model = peft_model_of(base, args)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = get_wsd_schedule(
        optim, 0, num_decay_steps=len(batches), num_stable_steps=0, decay_type="linear", min_lr_ratio=0.1
    )
    model.train()
    for idx in batches:
        ids = windows[idx].to(lm.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        clock.mark(loss.item())
    return {"mixed_precision": "fp32"}


def run_trainer(base, lm, args, windows, batches, clock: StepClock) -> dict:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock.mark()

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    rows = [{"input_ids": windows[i], "labels": windows[i]} for idx in batches for i in idx.tolist()]
    with tempfile.TemporaryDirectory(prefix="bench-lora-trainer-") as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=len(batches),
            learning_rate=args.lr,
            weight_decay=0.0,
            warmup_steps=0,
            lr_scheduler_type="warmup_stable_decay",
            lr_scheduler_kwargs={
                "num_decay_steps": len(batches),
                "decay_type": "linear",
                "min_lr_ratio": 0.1,
            },
            max_grad_norm=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=lm.device.type == "cpu",
            seed=args.seed,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
            dataloader_pin_memory=False,
        )
        trainer = Trainer(
            model=peft_model_of(base, args),
            args=targs,
            train_dataset=rows,
            data_collator=default_data_collator,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)  # its per-step dicts, not ours to print
        trainer.train()
    return {"mixed_precision": "fp32", "optim": targs.optim if isinstance(targs.optim, str) else targs.optim.value}


def timed_run(name: str, base, lm, args, data_dir, windows, batches, clock: StepClock | None = None) -> dict:
    clock = clock or StepClock()
    w0, c0 = time.perf_counter(), time.process_time()
    with PeakRSS() as mem:
        if name == "ours":
            info = run_ours(base, lm, args, data_dir, len(batches), clock)
        elif name == "plain":
            info = run_plain(base, lm, args, windows, batches, clock)
        else:
            info = run_trainer(base, lm, args, windows, batches, clock)
    wall, cpu, steps = clock.per_step()
    tokens = steps * args.batch * args.seq_len
    return {
        "name": name,
        **info,
        "steps_timed": steps,
        "seconds_per_step": wall / steps,
        "cpu_seconds_per_step": cpu / steps,
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "losses": clock.losses,
        "final_loss": clock.losses[-1] if clock.losses else None,
        "peak_rss_gib": mem.peak,
        "rss_before_gib": mem.before,
        "memory_method": mem.method,
        "total_seconds": time.perf_counter() - w0,
        "total_cpu_seconds": time.process_time() - c0,
    }


# -- where the time goes ---------------------------------------------------------------------------
def profile_second_step(name: str, base, lm, args, data_dir, windows, batches) -> dict:
    """torch.profiler from the end of step 1 to the end of step 2 of a 2-step run, grouped by kind."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    marks = {"wall": 0.0}

    def on_mark(n: int) -> None:
        if n == 1:
            marks["wall"] = time.perf_counter()
            prof.start()
        elif n == 2:
            prof.stop()
            marks["wall"] = time.perf_counter() - marks["wall"]

    clock = StepClock(on_mark)
    timed_run(name, base, lm, args, data_dir, windows, batches[:2], clock)
    seconds = group_profile(prof, lm.model.config.vocab_size)
    return {"seconds": seconds, "total": sum(seconds.values()), "wall_profiled": marks["wall"]}


# -- main ------------------------------------------------------------------------------------------
def summarize(runs: list[dict], args) -> dict:
    out = {}
    for name in IMPLEMENTATIONS:
        mine = [r for r in runs if r["name"] == name]
        if not mine:
            continue
        steps = sum(r["steps_timed"] for r in mine)
        wall = sum(r["seconds_per_step"] * r["steps_timed"] for r in mine)
        cpu = sum(r["cpu_seconds_per_step"] * r["steps_timed"] for r in mine)
        tokens = steps * args.batch * args.seq_len
        out[name] = {
            "seconds_per_step": wall / steps,
            "cpu_seconds_per_step": cpu / steps,
            "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu,
            "final_loss": mine[0]["final_loss"],
            "first_loss": mine[0]["losses"][0] if mine[0]["losses"] else None,
            "peak_rss_gib": max(r["peak_rss_gib"] for r in mine),
            "mixed_precision": mine[0].get("mixed_precision"),
        }
    return out


def main(argv=None) -> dict:
    from frankenlab.pipeline.stages.lora import PROJECTIONS, Config

    d = Config()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    ap.add_argument("--dataset", default="wikitext2", help="the stage's training set (default: wikitext2)")
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps per run (at least 2)")
    ap.add_argument("--batch", type=int, default=d.batch_size, help="windows per step")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each way")
    ap.add_argument("--rank", type=int, default=d.rank)
    ap.add_argument("--alpha", type=float, default=d.alpha)
    ap.add_argument("--dropout", type=float, default=d.dropout)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--targets", nargs="+", default=list(d.targets), choices=PROJECTIONS)
    ap.add_argument("--only", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    ap.add_argument("--gemm-seconds", type=float, default=1.0, help="seconds per shape when timing the GEMM rates")
    ap.add_argument(
        "--stage-extras",
        action="store_true",
        help="keep the stage's validation and checkpoints on (extra work: then not equal work)",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip where the time goes (torch.profiler)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        ap.error("--steps must be at least 2 and --repeats at least 1 (step 1 is warm-up, timed for nobody)")

    from frankenlab.pipeline.loading import load_model

    lm = load_model(args.model, dtype="float32")
    base = lm.model
    cpu = cpu_capability()
    print(machine_line(lm))
    print(
        f"CPU capability: torch {cpu['capability']}; {cpu['model'] or 'model unknown'}; flags "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
        + f"; oneDNN bf16: {cpu['mkldnn_bf16']}"
    )
    load_start = load_average()
    print(f"load average at start: {load_start}")
    windows, batches = step_batches(lm, args, args.data_dir)
    flops = train_flops_per_token(base, args.seq_len, args.rank, args.targets)
    print(
        f"work: {args.steps} steps x {args.batch} windows x {args.seq_len} tokens ({args.dataset}, "
        f"{windows.shape[0]} windows), rank {args.rank}, alpha {args.alpha}, dropout {args.dropout}, lr {args.lr}, "
        f"targets {','.join(args.targets)}, seed {args.seed}; timed from the end of step 1; ours with "
        + ("its validation and checkpoints (--stage-extras)" if args.stage_extras else "validation/checkpoints off")
    )
    print(
        f"training FLOPs per token: {flops['total'] / 1e6:.1f} M (forward {flops['forward'] / 1e6:.1f}, backward "
        f"through activations {flops['backward'] / 1e6:.1f}, adapters {flops['adapters'] / 1e6:.2f})"
    )
    figures: dict = {
        "model": lm.source.name,
        "device": str(lm.device),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "load_start": load_start,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "dataset": args.dataset,
        "train_flops_per_token": flops,
        "runs": [],
    }
    fp32_rates, bf16_rates = [], []
    for rep in range(args.repeats):
        rate = matmul_rate(base, seconds=args.gemm_seconds)
        fp32_rates.append(rate)
        line = f"[{rep}] best fp32 GEMM {rate['gflops_wall']:.1f} GFLOP/s wall, {rate['gflops_cpu']:.1f} per CPU-s"
        if lm.device.type == "cpu" and cpu["mkldnn_bf16"] is not False:
            b = bf16_rate(base, seconds=args.gemm_seconds)
            bf16_rates.append(b)
            line += f"; best bf16 F.linear {b['gflops_wall']:.1f} GFLOP/s wall, {b['gflops_cpu']:.1f} per CPU-s"
        print(f"{line}; load {load_average()}", flush=True)
        for name in args.only:
            r = timed_run(name, base, lm, args, args.data_dir, windows, batches)
            r["repeat"] = rep
            figures["runs"].append(r)
            print(
                f"[{rep}] {name:8s} {r['seconds_per_step']:.2f} s/step, {r['cpu_seconds_per_step']:.2f} CPU-s/step, "
                f"{r['tokens_per_cpu_s']:.0f} tok per CPU-s; loss {r['losses'][0]:.4f} -> {r['final_loss']:.4f}; "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB (from {r['rss_before_gib']:.2f}); {r.get('mixed_precision')}"
                + (f" + {', '.join(r['speed_ups'])}" if r.get("speed_ups") else "")
                + "; "
                f"load {load_average()}",
                flush=True,
            )
    summary = summarize(figures["runs"], args)
    figures["summary"] = summary
    best32 = max(r["gflops_cpu"] for r in fp32_rates)
    best16 = max((r["gflops_cpu"] for r in bf16_rates), default=None)
    figures["gemm_gflops_per_cpu_s"] = {"fp32": best32, "bf16": best16}
    print(
        f"\nequal work, {args.repeats} run(s) each; memory: {figures['runs'][0]['memory_method']}; ceiling: "
        f"{flops['total'] / 1e6:.0f} MFLOP per token at the best GEMM per CPU-second (fp32 {best32:.0f} GFLOP"
        + (f", bf16 {best16:.0f}" if best16 else "")
        + ")"
    )
    print("| way | s/step | CPU-s/step | tok/CPU-s | loss after N | vs ours | peak RSS GiB | of fp32 ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    ref = summary.get("ours")
    for name, s in summary.items():
        s["ceiling_fraction_fp32"] = s["tokens_per_cpu_s"] * flops["total"] / (best32 * 1e9)
        if best16:
            s["ceiling_fraction_bf16"] = s["tokens_per_cpu_s"] * flops["total"] / (best16 * 1e9)
        rel = (s["final_loss"] - ref["final_loss"]) / ref["final_loss"] if ref and ref["final_loss"] else None
        s["loss_rel_diff_vs_ours"] = rel
        print(
            f"| {name} | {s['seconds_per_step']:.2f} | {s['cpu_seconds_per_step']:.2f} | {s['tokens_per_cpu_s']:.0f} "
            f"| {s['final_loss']:.4f} | {'-' if rel is None else f'{rel:+.2%}'} | {s['peak_rss_gib']:.2f} | "
            f"{s['ceiling_fraction_fp32']:.2f}"
            + (f" ({s['ceiling_fraction_bf16']:.2f} of bf16)" if best16 else "")
            + " |"
        )
    for key, other in (("plain_peft_ratio", "plain"), ("trainer_ratio", "trainer")):
        if ref and other in summary:
            figures[key] = ref["tokens_per_cpu_s"] / summary[other]["tokens_per_cpu_s"]
            figures[f"{other}_loss_rel_diff"] = summary[other]["loss_rel_diff_vs_ours"]
            print(
                f"ours / {other}: {figures[key]:.2f}x the tokens per CPU-second; loss after {args.steps} steps "
                f"differs by {abs(summary[other]['loss_rel_diff_vs_ours']):.2%}"
            )
    if lm.device.type == "cpu" and not args.no_profile:
        figures["breakdown"] = {}
        for name in [n for n in ("ours", "plain") if n in args.only]:
            b = profile_second_step(name, base, lm, args, args.data_dir, windows, batches)
            figures["breakdown"][name] = b
            print(
                f"where step 2 of {name}'s time goes (torch.profiler, operators' self time {b['total']:.2f} s, "
                f"{b['wall_profiled']:.2f} s wall profiled): "
                + ", ".join(f"{k} {v:.2f} s ({v / b['total']:.0%})" for k, v in b["seconds"].items())
            )
    figures["load_end"] = load_average()
    print(f"load average at end: {figures['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
