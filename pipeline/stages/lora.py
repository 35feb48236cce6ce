"""LoRA recovery fine-tuning (PEFT): win back what pruning cost, on plain text.

Thesis defaults: rank 8, dropout 0.1, on q,k,v,o, trained on WikiText-style articles (8192 samples
in batches of 8), or on TriviaQA question/answer pairs for a "task" adapter. Text is packed into
`seq_len`-token windows (documents joined with the EOS token) and the loss is the plain LM loss.

Training data is always a train split, never what the recipe evaluates: `wikitext2` is WikiText-2
train (offline the tokenised v1 split, whose rare words are `<unk>`: the report says so),
`triviaqa` the TriviaQA train-split questions, `wiki` 30 Wikipedia articles, or a file. Before
any weights load, the runner's preflight asks this stage (`preflight` hook) to compare its whole
training file with the questions and rows the recipe will evaluate (`evals.overlap`) and refuses
the run when any are in it.

Sparsity: merging an adapter (B @ A is dense) fills the zeros width pruning left. With
`merge = true` (default) the zero mask of every targeted matrix is captured before training and
re-applied after merging, so the pattern still holds; with `merge = false` the adapter stays a
separate PEFT module and the base weights keep their zeros. Either way the report states which,
with the measured density. The adapter is always saved in PEFT's format under `<stage>/adapter`.

Cancelling takes effect within a step, at the next decoder layer of its forward or backward pass
(a step of the bundled model takes ~20 s on a CPU); the unfinished step is dropped, the adapter of
the last completed step is saved and recorded, then the run ends as cancelled.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frankenlab.evals import devices
from frankenlab.evals.cancel import Cancelled, cancel_between_layers
from frankenlab.evals.config import option, require
from frankenlab.evals.data import load_dataset_records, source_note
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.overlap import check_training_data
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.lora_adapters import _peft, is_peft, merge_keeping_mask, sparse_masks, targeted_density

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "no", "bf16", "fp16")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".gz")
# training set name -> dataset (evals.data): train splits only
TRAINING_SETS = {"wikitext2": "wikitext2-train", "triviaqa": "triviaqa-train", "wiki": "wiki"}


@dataclass(frozen=True)
class Config:
    rank: int = option(8, help="LoRA rank r of the adapter matrices (thesis: 8)")
    alpha: float = option(16.0, form=False, help="LoRA scaling alpha (the update is scaled by alpha / rank)")
    dropout: float = option(0.1, form=False, help="dropout on the adapter's input during training")
    targets: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        form=False,
        help="projections that get an adapter (thesis: the attention ones)",
    )
    dataset: str = option(
        "wiki",
        label="data",
        help="training text: wikitext2 (WikiText-2 train), triviaqa (train "
        "questions), wiki (30 Wikipedia articles), or a .txt/.jsonl file",
    )
    samples: int = option(8192, help="training sequences in all (thesis: 8192 in batches of 8)")
    steps: int | None = option(None, help="optimizer steps; when given it replaces samples")
    batch_size: int = option(8, form=False, help="sequences per micro-batch")
    grad_accum: int = option(1, form=False, help="micro-batches per optimizer step")
    lr: float = option(2e-4, form=False, help="peak learning rate (linear decay to 10 %)")
    warmup_steps: int = option(0, form=False, help="linear warm-up steps")
    seq_len: int = option(256, form=False, help="tokens per training window")
    mixed_precision: str = option("auto", form=False, choices=PRECISIONS, help="auto: bf16/fp16 on GPU, fp32 on CPU")
    merge: bool = option(
        True, form=False, help="merge into the weights and re-apply the sparsity mask; false keeps the adapter separate"
    )
    seed: int = option(0, form=False, help="seed for data order and adapter initialisation")

    def __post_init__(self):
        require(self.rank >= 1, f"rank must be at least 1, got {self.rank}")
        require(self.alpha > 0, f"alpha must be positive, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        require(not bad, f"unknown target projection(s) {bad}; choose from {', '.join(PROJECTIONS)}")
        require(len(self.targets) > 0, "targets must name at least one projection (e.g. q_proj, v_proj)")
        is_file = self.dataset.endswith(FILE_SUFFIXES)
        require(
            is_file or self.dataset in TRAINING_SETS,
            f"unknown training dataset {self.dataset!r}: use {', '.join(TRAINING_SETS)}, or a .txt/.jsonl file path",
        )
        require(self.samples >= 1, f"samples must be at least 1, got {self.samples}")
        require(self.steps is None or self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum must be at least 1, got {self.grad_accum}")
        require(self.lr > 0, f"lr (learning rate) must be positive, got {self.lr}")
        require(self.warmup_steps >= 0, "warmup_steps cannot be negative")
        require(self.seq_len >= 8, f"seq_len must be at least 8 tokens, got {self.seq_len}")
        require(
            self.mixed_precision in PRECISIONS,
            f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}",
        )

    @property
    def total_steps(self) -> int:
        return self.steps or max(1, math.ceil(self.samples / (self.batch_size * self.grad_accum)))


# -- hooks the registry asks (pipeline/stages/__init__.py) -----------------------------------------
ROLE = "adapter"


def describe(params: dict) -> str:
    rank, data = params.get("rank", params.get("r")), params.get("dataset", params.get("data"))
    return " ".join(["LoRA"] + ([f"r{rank}"] if rank is not None else []) + ([str(data)] if data else []))


def resume_problem(record: dict) -> str | None:
    if (record.get("params") or {}).get("merge") is False:
        return "kept its LoRA adapter unmerged and saved only the adapter, not a full model"
    return None


def check_order(kinds_before: list[str]) -> None:
    """Called by the recipe with the kinds of the stages before this one."""
    require(
        "gptq" not in kinds_before,
        "LoRA after GPTQ is not supported: put the lora stage before gptq "
        "(EoRA is the training-free way to recover after quantizing)",
    )


# -- data ------------------------------------------------------------------------------------------
def record_text(record: dict) -> str:
    """Training text of one record: plain text, or a question/answer pair (TriviaQA-style)."""
    if record.get("text"):
        return record["text"]
    answer = record.get("answer") or (record.get("answers") or [""])[0]
    if record.get("context"):  # TriviaQA here: context = "Question: ...\nAnswer:"
        return f"{record['context']} {answer}".strip()
    if record.get("question"):
        return f"Question: {record['question']}\nAnswer: {answer}".strip()
    return ""


def record_question(record: dict) -> str:
    """The question of a question/answer record ("" for plain text)."""
    if record.get("question"):
        return str(record["question"])
    ctx = record.get("context") or ""
    return ctx.split("Question:", 1)[-1].rsplit("Answer:", 1)[0].strip() if "Question:" in ctx else ""


def training_records(config: Config, data_dir=None) -> tuple[list[dict], str, str]:
    """(records, source, note) of the training data; note says what a user should know about it."""
    is_file = config.dataset.endswith(FILE_SUFFIXES)
    name = "file" if is_file else TRAINING_SETS[config.dataset]
    records, source = load_dataset_records(name, path=config.dataset if is_file else None, data_dir=data_dir)
    return records, source, source_note(name, source)


def preflight(config: Config, evaluation, data_dir=None) -> list[str]:
    """Refuse training data that holds evaluated questions or rows (before any weights load);
    near duplicates come back as warnings for the run's log."""
    records, source, _ = training_records(config, data_dir)
    texts = [record_text(r) for r in records]
    return check_training_data(
        texts,
        [record_question(r) for r in records],
        source,
        evaluation,
        data_dir,
        who="LoRA",
        advice='use the train split (dataset = "triviaqa" or "wikitext2") or exclude them',
    )


def check_config(config: Config, model_config: dict) -> None:
    """Training windows no longer than the model takes, refused before any weights load."""
    from frankenlab.pipeline.calibration import check_seq_len

    check_seq_len(config.seq_len, model_config, key="seq_len")


def training_windows(tokenizer, config: Config, data_dir=None, needed: int | None = None) -> tuple[torch.Tensor, str]:
    """(windows, seq_len) token ids from the dataset, documents joined with EOS, shuffled per seed."""
    records, source, _ = training_records(config, data_dir)
    texts = [t for t in (record_text(r) for r in records) if t.strip()]
    if not texts:
        raise RecipeError(f"LoRA training data {source} holds no text (expected 'text' or question/answer fields)")
    random.Random(config.seed).shuffle(texts)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    want = (needed or len(texts) * 10**6) * config.seq_len
    ids: list[int] = []
    for t in texts:  # tokenize only as much as the run can use
        ids.extend(tokenizer(t).input_ids + [eos])
        if len(ids) >= want:
            break
    n = len(ids) // config.seq_len
    if n < 1:
        raise RecipeError(f"LoRA training data {source} has {len(ids)} tokens, fewer than seq_len={config.seq_len}")
    return torch.tensor(ids[: n * config.seq_len]).view(n, config.seq_len), source


# -- training --------------------------------------------------------------------------------------
def _autocast(device: torch.device, setting: str):
    if device.type != "cuda" or setting == "no":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "auto":
        from frankenlab.evals.devices import half_dtype

        return half_dtype(device)  # bf16 where the card computes it natively, else fp16
    return torch.bfloat16


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


def _accumulate(peft_model, windows, step_idx, micro: int, ctx: StageContext, amp, scaler) -> float:
    """Forward and backward over one step's sequences in micro-batches of `micro`; each micro-batch's
    mean loss is weighted by its share of the step, so the gradient does not depend on `micro`."""
    step_loss = 0.0
    for b in range(0, len(step_idx), micro):
        if ctx.cancelled:
            raise Cancelled("cancelled by the user")
        chunk = step_idx[b : b + micro]
        batch = windows[torch.stack(chunk)].to(ctx.device)  # (B, T)
        with cancel_between_layers(peft_model, lambda: ctx.cancelled):  # within a step, not after it
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                loss = peft_model(input_ids=batch, labels=batch).loss * (len(chunk) / len(step_idx))
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += float(loss.detach())
    return step_loss


def source_note_for(config: Config, source: str) -> str:
    return "" if config.dataset.endswith(FILE_SUFFIXES) else source_note(TRAINING_SETS[config.dataset], source)


def run(model: nn.Module, ctx: StageContext, config: Config) -> StageResult:
    LoraConfig, get_peft_model = _peft()
    if is_peft(model):
        raise RecipeError(
            "the model already carries an unmerged LoRA adapter: use merge = true in the first "
            "lora stage, or only one lora stage"
        )
    work = Path(ctx.work_dir) if ctx.work_dir else None
    steps = config.total_steps
    per_step = config.batch_size * config.grad_accum
    windows, source = training_windows(ctx.tokenizer, config, ctx.data_dir, needed=steps * per_step)
    note = source_note_for(config, source)
    ctx.log(
        f"lora: {windows.shape[0]} windows of {config.seq_len} tokens from {source}; "
        f"{steps} steps x {per_step} sequences" + (f" ({note})" if note else "")
    )
    density_before = targeted_density(model, config.targets)
    masks_before = len(sparse_masks(model, config.targets))

    torch.manual_seed(config.seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.targets),
            task_type="CAUSAL_LM",
        ),
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

    amp = _autocast(ctx.device, config.mixed_precision)
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
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            for g in optim.param_groups:
                g["lr"] = lr_at(step)
            step_idx = [order[(cursor + i) % len(order)] for i in range(per_step)]
            cursor += per_step
            rng = _rng_state(ctx.device)
            while True:  # a step that runs out of memory is redone at half the micro-batch (same sequences)
                try:
                    step_loss = _accumulate(peft_model, windows, step_idx, micro, ctx, amp, scaler)
                    break
                except Exception as exc:
                    if not devices.is_oom(exc):
                        raise
                    optim.zero_grad(set_to_none=True)
                    devices.free_cached_memory(ctx.device)
                    if micro == 1:
                        raise torch.OutOfMemoryError(
                            devices.oom_message(
                                ctx.device,
                                f"in LoRA training with one sequence of {config.seq_len} tokens per micro-batch",
                                f"lower seq_len (now {config.seq_len}) or rank (now {config.rank}), "
                                "or target fewer modules",
                            )
                        ) from None
                    micro = max(1, micro // 2)
                    halvings.append({"step": step + 1, "batch_size": micro, "grad_accum": -(-per_step // micro)})
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
            ctx.progress(done / steps, f"LoRA step {done}/{steps}: loss {step_loss:.4f}, {tokens / dt:.0f} tok/s")
    except Cancelled:
        optim.zero_grad(set_to_none=True)
        if adapter_dir is not None and done:
            _point_adapter_at_input(peft_model, ctx)
            peft_model.save_pretrained(str(adapter_dir))
            ctx.log(f"lora: cancelled after {done} completed steps; their adapter is saved in {adapter_dir}")
        else:
            ctx.log(f"lora: cancelled after {done} completed steps; nothing to keep", "warning")
        raise
    finally:
        peft_model.eval()
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
        "dataset_note": source_note_for(config, source),
        "steps": done,
        "samples": done * per_step,
        "tokens": tokens_total,
        "trainable_params": n_trainable,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses if len(losses) <= 512 else losses[:: math.ceil(len(losses) / 512)],
        "seconds_training": seconds,
        "seconds_per_step": seconds / max(1, done),
        "tokens_per_second": tokens_total / seconds if seconds else 0.0,
        "mixed_precision": str(amp).replace("torch.", "") if amp else "fp32" if ctx.device.type == "cpu" else "off",
        "merged": config.merge,
        "sparsity": sparsity,
        "density_before": density_before,
        "density_after": targeted_density(out, config.targets),
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "batch_size": micro,
        "grad_accum": -(-per_step // micro),
        "oom_retries": halvings,
    }
    if halvings:
        report["oom_note"] = (
            f"out of memory: micro-batch lowered from {config.batch_size} to {micro} with "
            f"{report['grad_accum']} accumulation steps; the effective batch stayed {per_step} sequences"
        )
        ctx.log(f"lora: {report['oom_note']}")
    ctx.log(
        f"lora: loss {report['first_loss']:.4f} -> {report['final_loss']:.4f} in {done} steps; {sparsity}; "
        f"targeted density {report['density_after']:.4f}"
    )
    return StageResult(out, report, artifacts)
