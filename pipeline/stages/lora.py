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

This module holds the Config, the registry's hooks and the training data; `run` prepares the
windows and hands them to `pipeline/lora_train.py`, which trains, merges and reports.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from frankenlab.evals import devices
from frankenlab.evals.config import option, require, to_dict
from frankenlab.evals.data import load_dataset_records, source_note
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.overlap import check_training_data
from frankenlab.pipeline import lora_progress, lora_train
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.lora_adapters import is_peft
from frankenlab.pipeline.lora_loss import LOSSES

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
    steps: int | Literal["auto"] | None = option(
        None,
        help='optimizer steps; when given it replaces samples; "auto": stop when the validation loss '
        "stops improving (at most max_steps)",
    )
    max_steps: int | None = option(
        None, form=False, help='the cap of steps = "auto" (empty: the steps that samples make)'
    )
    eval_every: int = option(
        lora_progress.EVAL_EVERY,
        form=False,
        help="optimizer steps between validation losses on held-out training windows (0: none)",
    )
    val_windows: int = option(
        lora_progress.VAL_WINDOWS,
        form=False,
        help="training windows held out for validation (the last ones, at most a quarter; never evaluation data)",
    )
    patience: int = option(
        lora_progress.PATIENCE,
        form=False,
        help='validations without a min_delta improvement before steps = "auto" stops',
    )
    min_delta: float = option(
        lora_progress.MIN_DELTA,
        form=False,
        help="relative validation-loss improvement that counts for patience (0.005 = 0.5 %)",
    )
    checkpoint_every: int = option(
        lora_progress.CHECKPOINT_EVERY,
        form=False,
        help="optimizer steps between checkpoints a killed run resumes from (0: only when cancelled)",
    )
    batch_size: int = option(8, form=False, help="sequences per micro-batch")
    grad_accum: int = option(1, form=False, help="micro-batches per optimizer step")
    lr: float = option(2e-4, form=False, help="peak learning rate (linear decay to 10 %)")
    warmup_steps: int = option(0, form=False, help="linear warm-up steps")
    seq_len: int = option(256, form=False, help="tokens per training window")
    mixed_precision: str = option(
        "auto",
        form=False,
        choices=PRECISIONS,
        help="auto: bf16/fp16 on GPU; on CPU bf16 where it has bf16 matmul units and measures faster, else fp32",
    )
    loss: str = option(
        "ce",
        choices=LOSSES,
        help="ce: the plain LM loss; kd: distil the source model (the one before the first stage); ce+kd: both",
    )
    temperature: float = option(2.0, form=False, help="distillation temperature T (the KL is scaled by T^2)")
    kd_weight: float = option(0.5, form=False, help="weight of the distillation term in ce+kd (CE gets 1 - it)")
    teacher_top_k: int = option(
        64, form=False, help="teacher logits kept per token, cached on disk for reuse; 0: the full distribution, live"
    )
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
        require(
            self.steps is None or self.steps == "auto" or self.steps >= 1,
            f'steps must be at least 1 (or "auto"), got {self.steps}',
        )
        require(self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}")
        require(self.eval_every >= 0, f"eval_every must be 0 (no validation) or more, got {self.eval_every}")
        require(self.val_windows >= 0, f"val_windows cannot be negative, got {self.val_windows}")
        require(self.patience >= 1, f"patience must be at least 1 validation, got {self.patience}")
        require(0.0 <= self.min_delta < 1.0, f"min_delta must be in [0, 1), got {self.min_delta}")
        require(self.checkpoint_every >= 0, f"checkpoint_every must be 0 or more, got {self.checkpoint_every}")
        require(
            self.steps != "auto" or (self.eval_every >= 1 and self.val_windows >= 1),
            'steps = "auto" stops on the validation loss: set eval_every and val_windows to at least 1',
        )
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum must be at least 1, got {self.grad_accum}")
        require(self.lr > 0, f"lr (learning rate) must be positive, got {self.lr}")
        require(self.warmup_steps >= 0, "warmup_steps cannot be negative")
        require(self.seq_len >= 8, f"seq_len must be at least 8 tokens, got {self.seq_len}")
        require(
            self.mixed_precision in PRECISIONS,
            f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}",
        )
        require(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        require(0.0 < self.kd_weight < 1.0, f"kd_weight must be in (0, 1), got {self.kd_weight}")
        require(
            self.teacher_top_k >= 0, f"teacher_top_k must be 0 (full distribution) or more, got {self.teacher_top_k}"
        )

    @property
    def total_steps(self) -> int:
        """The steps to run; for steps = "auto" the cap (max_steps, else what samples make)."""
        from_samples = max(1, math.ceil(self.samples / (self.batch_size * self.grad_accum)))
        if self.steps == "auto":
            return self.max_steps or from_samples
        return self.steps or from_samples


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


def source_note_for(config: Config, source: str) -> str:
    return "" if config.dataset.endswith(FILE_SUFFIXES) else source_note(TRAINING_SETS[config.dataset], source)


# -- the run (the training loop: pipeline/lora_train.py) ----------------------------------------------
def _autocast(device: torch.device, setting: str):
    """The autocast dtype of `mixed_precision` on `device` (None: fp32); `devices.lora_precision` decides."""
    return devices.lora_precision(device, setting)[0]


def run(model: nn.Module, ctx: StageContext, config: Config) -> StageResult:
    """The stage: the training windows (the last ones held out for validation), then `lora_train.train`."""
    if is_peft(model):
        raise RecipeError(
            "the model already carries an unmerged LoRA adapter: use merge = true in the first "
            "lora stage, or only one lora stage"
        )
    steps = config.total_steps
    per_step = config.batch_size * config.grad_accum
    val_asked = config.val_windows if config.eval_every else 0
    windows, source = training_windows(ctx.tokenizer, config, ctx.data_dir, needed=steps * per_step + val_asked)
    expect = lora_progress.fingerprint(to_dict(config), windows, model, config.targets)  # what a checkpoint must match
    windows, val = lora_progress.split_windows(windows, val_asked)  # held out before the order is drawn
    auto = config.steps == "auto"
    note = source_note_for(config, source)
    ctx.log(
        f"lora: {windows.shape[0]} windows of {config.seq_len} tokens from {source}"
        + (f" and the last {val.shape[0]} held out for validation" if val.shape[0] else "")
        + f"; {'at most ' if auto else ''}{steps} steps x {per_step} sequences"
        + (f' (steps = "auto": stops after {config.patience} validations without improvement)' if auto else "")
        + (f" ({note})" if note else "")
    )
    if auto and not val.shape[0]:
        raise RecipeError(
            f'steps = "auto" needs held-out windows, but {source} makes only {windows.shape[0]}: '
            "use more training text or a number of steps"
        )
    return lora_train.train(model, ctx, config, windows, val, source=source, note=note, expect=expect)
