"""The LoRA stage's training run: from packed windows to the adapter, the merged model and the report.

`pipeline/stages/lora.py` holds the stage's Config, its registry hooks and its training data, and
hands the windows to `train` here: the PEFT model and the optimizer, the optimizer steps (each one
over `batch_size x grad_accum` sequences in micro-batches, `_accumulate`), the out-of-memory halving
(a step or a validation that runs out of memory is redone at half the micro-batch, the effective
batch kept), the validations and checkpoints between steps (`pipeline.lora_progress`), the
distillation teacher (`pipeline.distill`), the merge (`pipeline.lora_adapters`) and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from frankenlab.evals import devices
from frankenlab.evals.cancel import Cancelled, cancel_between_layers
from frankenlab.pipeline import distill, lora_progress, lora_speed
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.lora_adapters import add_adapter, merge_keeping_mask, sparse_masks, targeted_density
from frankenlab.pipeline.lora_loss import LossSpec, micro_batch_loss


def _point_adapter_at_input(peft_model, ctx: StageContext) -> None:
    """adapter_config.json names the model the adapter was trained on: this stage's input (the
    previous stage's saved folder, a pruned model, or the source model), not the original hub id."""
    if ctx.input_artifact:
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = str(ctx.input_artifact)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _accumulate(
    peft_model, windows, step_idx, micro: int, ctx: StageContext, amp, scaler, spec=None, teacher=None, parts=None
) -> float:
    """Forward and backward over one step's sequences in micro-batches of `micro`; each micro-batch's
    mean loss is weighted by its share of the step, so the gradient does not depend on `micro`.
    The loss is `pipeline.lora_loss` (chunked head; `spec` says ce, kd or ce+kd, `teacher` gives the
    teacher's side); `parts`, when given, receives the step's CE and KD parts."""
    step_loss, ce, kd = 0.0, 0.0, 0.0
    for b in range(0, len(step_idx), micro):
        if ctx.cancelled:
            raise Cancelled("cancelled by the user")
        chunk = step_idx[b : b + micro]
        batch = windows[torch.stack(chunk)].to(ctx.device)  # (B, T)
        with cancel_between_layers(peft_model, lambda: ctx.cancelled):  # within a step, not after it
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                side = teacher.batch(torch.stack(chunk), batch) if teacher is not None else None
                out = micro_batch_loss(peft_model, batch, spec, side)
                share = len(chunk) / len(step_idx)
                loss = out.loss * share
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += float(loss.detach())
        ce += out.ce * share
        kd += (out.kd or 0.0) * share
    if parts is not None:
        parts.update(ce=ce, kd=kd if spec is not None and spec.kind != "ce" else None)
    return step_loss


def _halved(ctx: StageContext, micro: int, per_step: int, at: int, halvings: list, what: str, lower: str) -> int:
    """After an out of memory at step `at`: the device's cache freed and the micro-batch halved (recorded in
    `halvings`; accumulation grows to keep `per_step`); at one sequence already, an OutOfMemoryError that
    says `what` ran out and what to `lower`."""
    devices.free_cached_memory(ctx.device)
    if micro == 1:
        raise torch.OutOfMemoryError(devices.oom_message(ctx.device, what, lower)) from None
    micro = max(1, micro // 2)
    halvings.append({"step": at, "batch_size": micro, "grad_accum": -(-per_step // micro)})
    return micro


def _resumed_precision(state: dict | None, setting: str, device, amp, why: str):
    """Under `mixed_precision = "auto"` a resumed run keeps the precision its checkpoint was trained
    in (the auto decision measures this process and can differ between two runs of one machine);
    an explicit setting decides the same way every time."""
    saved = (state or {}).get("compute_dtype")
    now = devices.dtype_name(amp) if amp else "float32"
    if setting != "auto" or saved is None or saved == now:
        return amp, why
    kept = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}.get(saved, amp)
    if kept is torch.float16 and torch.device(device).type == "cpu":
        return amp, why
    return kept, f"auto: kept {saved} as the checkpoint was trained (this process measured {now})"


def train(
    model: nn.Module,
    ctx: StageContext,
    config,
    windows: torch.Tensor,
    val: torch.Tensor,
    *,
    source: str,
    note: str,
    expect,
) -> StageResult:
    """Train the adapter of `config` (the stage's Config) on `windows`, validating on `val` (held out),
    resuming a checkpoint of this very run (`expect`, `lora_progress.fingerprint`); `source` and `note`
    say where the windows came from."""
    work = Path(ctx.work_dir) if ctx.work_dir else None
    steps = config.total_steps
    per_step = config.batch_size * config.grad_accum
    auto = config.steps == "auto"

    density_before = targeted_density(model, config.targets)
    masks_before = len(sparse_masks(model, config.targets))

    peft_model = add_adapter(
        model, rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets, seed=config.seed
    )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optim = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    warm = config.warmup_steps

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10 % of lr
        if warm and step < warm:
            return config.lr * (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return config.lr * (1.0 - 0.9 * frac)

    # never starting over: a checkpoint of this very run (same config, data, input) continues it
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    ckpt = lora_progress.checkpoint_file(work)
    state, why = lora_progress.load_checkpoint(ckpt, expect, named)
    amp, amp_why = devices.lora_precision(ctx.device, config.mixed_precision)  # fp16 on a CPU: RecipeError
    amp, amp_why = _resumed_precision(state, config.mixed_precision, ctx.device, amp, amp_why)
    precision = f"{ {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(amp, 'fp32') } ({amp_why})"  # what runs, why
    ctx.log(f"lora: mixed precision {precision}" + ("; adapters and optimizer state in fp32" if amp else ""))
    spec = LossSpec(config.loss, config.temperature, config.kd_weight)
    teacher, teacher_seconds = None, 0.0
    if config.loss != "ce":  # the run's source model, never this stage's input
        t_teacher = time.perf_counter()
        teacher = distill.Teacher(ctx.source_model, ctx.device, windows, config.teacher_top_k, config.temperature)
        teacher.prepare(config.batch_size, amp, ctx.log)
        teacher_seconds = time.perf_counter() - t_teacher
    step_parts: dict = {}
    ce_curve: list[float] = []
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(config.seed))
    cursor = 0
    losses: list[float] = []
    tokens_total = 0
    adapter_dir = work / "adapter" if work else None
    peft_model.train()
    t_start = time.perf_counter()
    done = 0
    micro = config.batch_size  # halves after an out of memory; accumulation grows to keep per_step
    halvings: list[dict] = []
    val_curve, stop, seconds_before = [], None, 0.0
    if why:
        ctx.log(f"lora: {why}", "warning")
    if state is not None:
        lora_progress.restore(state, named, optim, scaler, ctx.device)
        done, losses, val_curve = state["step"], list(state["losses"]), [list(v) for v in state["val_curve"]]
        tokens_total, micro, halvings = state["tokens"], state["micro"], list(state["halvings"])
        cursor, seconds_before = state["cursor"], state["seconds"]
        ctx.log(f"lora: resuming from the checkpoint at step {done}/{steps} ({ckpt}), not from step 0")
    start, rng_done, clock = done, _rng_state(ctx.device), lora_progress.StepClock()

    def checkpoint(at: int) -> None:
        if ckpt is not None and at > 0:
            lora_progress.save_checkpoint(
                ckpt,
                lora_progress.state_of(
                    expect=expect,
                    step=at,
                    per_step=per_step,
                    named=named,
                    optim=optim,
                    scaler=scaler,
                    rng=rng_done,
                    losses=losses,
                    val_curve=val_curve,
                    tokens=tokens_total,
                    micro=micro,
                    halvings=halvings,
                    seconds=seconds_before + time.perf_counter() - t_start,
                    compute_dtype=devices.dtype_name(amp) if amp else "float32",
                ),
            )

    def validate(at: int) -> float:
        nonlocal micro
        while True:  # out of memory: the same halving as a training step, kept for the steps after it
            try:
                loss = lora_progress.validation_loss(peft_model, val, micro, ctx.device, amp, lambda: ctx.cancelled)
                break
            except Exception as exc:
                if not devices.is_oom(exc):
                    raise
                micro = _halved(
                    ctx,
                    micro,
                    per_step,
                    at,
                    halvings,
                    f"in LoRA training (validation) with one sequence of {config.seq_len} tokens per micro-batch",
                    f"lower seq_len (now {config.seq_len}) or rank (now {config.rank}), or val_windows",
                )
                ctx.log(f"lora: out of memory in the validation after step {at}; micro-batch now {micro}", "warning")
        val_curve.append([at, loss])
        ctx.metric("lora_val_loss", loss, "train", step=at)
        return loss

    speed = contextlib.ExitStack()  # CPU bf16: frozen weights in bf16, cheaper dropout and attention, kept heap
    applied = speed.enter_context(lora_speed.fast_training(peft_model, ctx.device, amp, micro, config.seq_len))
    if applied:
        spec = dataclasses.replace(spec, chunk_tokens=lora_speed.head_chunk(peft_model))
        ctx.log(f"lora: CPU speed-ups: {', '.join(applied)}")
    try:
        if val.shape[0] and config.eval_every and not val_curve:
            validate(0)  # where the curve starts
        for step in range(start, steps):
            t0 = time.perf_counter()
            for g in optim.param_groups:
                g["lr"] = lr_at(step)
            step_idx = [order[(cursor + i) % len(order)] for i in range(per_step)]
            cursor += per_step
            rng = _rng_state(ctx.device)
            while True:  # a step that runs out of memory is redone at half the micro-batch (same sequences)
                try:
                    step_loss = _accumulate(
                        peft_model, windows, step_idx, micro, ctx, amp, scaler, spec, teacher, step_parts
                    )
                    ce_curve.append(step_parts["ce"])
                    break
                except Exception as exc:
                    if not devices.is_oom(exc):
                        raise
                    optim.zero_grad(set_to_none=True)
                    micro = _halved(
                        ctx,
                        micro,
                        per_step,
                        step + 1,
                        halvings,
                        f"in LoRA training with one sequence of {config.seq_len} tokens per micro-batch",
                        f"lower seq_len (now {config.seq_len}) or rank (now {config.rank}), or target fewer modules",
                    )
                    ctx.log(
                        f"lora: out of memory at step {step + 1}; retrying with micro-batch {micro} x "
                        f"{-(-per_step // micro)} accumulation steps (the same {per_step} sequences per step)",
                        "warning",
                    )
                    _set_rng_state(ctx.device, rng)
            if scaler:
                scaler.step(optim)
                scaler.update()
            else:
                optim.step()
            optim.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t0
            tokens = per_step * config.seq_len
            tokens_total += tokens
            losses.append(step_loss)
            ctx.metric("lora_loss", step_loss, "train", step=done)
            ctx.metric("lora_tokens_per_second", tokens / dt if dt else 0.0, "train", step=done)
            rng_done = _rng_state(ctx.device)  # what the next step starts from (validation draws nothing)
            val_loss = validate(done) if val.shape[0] and lora_progress.due(done, config.eval_every, steps) else None
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
                checkpoint(done)
            clock.tick()
            left = clock.left(done, steps, at_most=auto)
            ctx.progress(
                done / steps,
                f"LoRA step {done}/{steps}: loss {step_loss:.4f}, {tokens / dt:.0f} tok/s"
                + (f", {left}" if left else ""),
            )
            if val_loss is not None:
                ctx.log(f"lora: step {done}/{steps}, val loss {val_loss:.4f}" + (f", {left}" if left else ""))
            reason = lora_progress.plateau(val_curve, config.patience, config.min_delta) if auto else None
            if reason and val_loss is not None:
                stop = {"step": done, "cap": steps, "reason": reason}
                ctx.log(f"lora: stopping at step {done} of at most {steps}: {reason}")
                break
    except Cancelled:
        optim.zero_grad(set_to_none=True)
        if done > start and ckpt is not None:
            checkpoint(done)  # the last completed step: a rerun or replay continues from it
            ctx.log(f"lora: checkpoint at step {done} saved in {ckpt}; replay --from-stage continues from it")
        if adapter_dir is not None and done:
            _point_adapter_at_input(peft_model, ctx)
            peft_model.save_pretrained(str(adapter_dir))
            ctx.log(f"lora: cancelled after {done} completed steps; their adapter is saved in {adapter_dir}")
        else:
            ctx.log(f"lora: cancelled after {done} completed steps; nothing to keep", "warning")
        raise
    finally:
        speed.close()  # the fp32 frozen weights back before the merge
        peft_model.eval()
        if teacher is not None:
            teacher.release()
    seconds = time.perf_counter() - t_start

    if adapter_dir is not None:
        _point_adapter_at_input(peft_model, ctx)
        peft_model.save_pretrained(str(adapter_dir))
    artifacts = {"adapter": str(adapter_dir)} if adapter_dir is not None else {}
    if config.merge:
        out, remasked = merge_keeping_mask(peft_model)
        if masks_before:
            sparsity = f"mask re-applied after merge ({remasked} sparse matrices)"
        else:
            sparsity = "merged; the targeted matrices had no zeros to keep"
    else:
        out = peft_model
        sparsity = "adapter kept separate (not merged): base weights keep their zeros"
        if adapter_dir is not None:
            artifacts["model"] = str(adapter_dir)
    report = {
        "rank": config.rank,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "targets": list(config.targets),
        "dataset": source,  # the training file, as read
        "dataset_name": config.dataset,
        "dataset_note": note,
        "steps": done,
        "samples": done * per_step,
        "tokens": tokens_total,
        "trainable_params": n_trainable,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses if len(losses) <= 512 else losses[:: math.ceil(len(losses) / 512)],
        "seconds_training": seconds_before + seconds,
        "seconds_per_step": seconds / max(1, done - start),  # this process's steps (a resumed run: since then)
        "tokens_per_second": (done - start) * per_step * config.seq_len / seconds if seconds else 0.0,
        "mixed_precision": precision,  # what ran, and why
        "speed_ups": applied,  # pipeline.lora_speed: what applied (CPU, bf16)
        "compute_dtype": devices.dtype_name(amp) if amp else "float32",
        "loss": config.loss,
        "ce_curve": ce_curve if len(ce_curve) <= 512 else ce_curve[:: math.ceil(len(ce_curve) / 512)],
        "merged": config.merge,
        "sparsity": sparsity,
        "density_before": density_before,
        "density_after": targeted_density(out, config.targets),
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "batch_size": micro,
        "grad_accum": -(-per_step // micro),
        "oom_retries": halvings,
    }
    if teacher is not None:  # which teacher, how its logits came, and what it cost (in the stage's time)
        report.update(teacher.report(), temperature=config.temperature, teacher_seconds=teacher_seconds)
        if config.loss == "ce+kd":
            report["kd_weight"] = config.kd_weight
    report.update(
        val_curve=val_curve,  # [[step, validation loss], ...], step 0 = before training
        val_windows=int(val.shape[0]),
        val_note=f"the last {val.shape[0]} training windows of {source}, held out (never trained on)",
        loss_curve_every=max(1, math.ceil(len(losses) / 512)),  # loss_curve[i] is the loss of step 1 + i * this
        stop=stop
        or {
            "step": done,
            "cap": steps,
            "reason": "cap: the validation loss was still improving" if auto else "steps: the number asked for",
        },
        resumed_from=start or None,  # the checkpoint's step when this run continued one
    )
    lora_progress.remove_checkpoint(ckpt)  # finished: the adapter is saved
    if halvings:
        report["oom_note"] = (
            f"out of memory: micro-batch lowered from {config.batch_size} to {micro} with "
            f"{report['grad_accum']} accumulation steps; the effective batch stayed {per_step} sequences"
        )
        ctx.log(f"lora: {report['oom_note']}")
    ctx.log(
        f"lora: loss {report['first_loss']:.4f} -> {report['final_loss']:.4f} in {done} steps; {sparsity}; "
        f"targeted density {report['density_after']:.4f}"
        + (f"; {lora_progress.curve_text(report)}" if val_curve else "")
    )
    return StageResult(out, report, artifacts)
