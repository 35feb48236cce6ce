"""The LoRA stage's loss on one micro-batch, without a (tokens, vocabulary) logits matrix.

`micro_batch_loss` runs the decoder body of the PEFT-wrapped causal LM (`base.model(...)`: final
hidden states, no KV cache) and scores the next token `chunk_tokens` positions at a time through
the frozen output head. For each chunk the logits, the loss and the gradient of the loss with
respect to that chunk's hidden states are computed at once (`torch.autograd.grad` on the chunk),
and the chunk's logits are dropped before the next one: the full logits (8 x 256 x 49152 fp32 =
400 MB for the bundled model) are never stored, in the forward or in the backward. The hidden
states' gradient is handed to autograd through a surrogate term, so `loss.backward()` continues
into the decoder exactly as from HF's `model(input_ids, labels=labels).loss`: the same value
(shift by one, mean over tokens, labels of -100 ignored) and the same adapter gradients, to float
rounding (tests/test_lora_loss.py). The head costs two GEMMs (logits, then their gradient) instead
of HF's three (logits stored, gradient, plus the upcast copies); it never needs a weight gradient
(frozen). Only scored positions reach the head: the last position of a window has no next token
and is never projected.

Distillation (`loss = "kd" | "ce+kd"`) is scored in the same chunks against the teacher's
next-token distribution (`TeacherBatch`, from `pipeline.distill`): KL(teacher || student) of the
temperature-softened distributions, scaled by T^2 so its gradient keeps the size of the CE one
(Hinton et al., 2015). `ce+kd` is (1 - kd_weight) * CE + kd_weight * T^2 * KL.

- Full teacher distribution (`teacher_top_k = 0`): the teacher's hidden states come with the batch
  and its logits are computed chunk by chunk here, like the student's: exact KL.
- Top-k teacher (values, indices and the teacher's full-vocabulary logsumexp at T, cached on disk):
  the KL over k + 1 outcomes, the teacher's top-k tokens and one "tail" bucket holding the rest of
  the vocabulary. Teacher: p_i = exp(v_i / T - lse_T), tail 1 - sum p_i. Student: its log-softmax
  over the FULL vocabulary at T taken at those indices, tail = logsumexp of the student's other
  tokens. This is the KL of the two distributions coarse-grained to the same k + 1 outcomes: never
  negative, zero when student and teacher agree, never above the exact KL, and it keeps the
  teacher's tail mass instead of renormalising it away (renormalising alone would leave a positive
  loss, -log(top-k mass), when student == teacher, and would ignore how much mass the student puts
  outside the teacher's top k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frankenlab.evals.head import linear_head

LOSSES = ("ce", "kd", "ce+kd")
CHUNK_TOKENS = 512  # positions per head chunk: 512 x 49152 fp32 logits = 100 MB, a few such tiles at most
IGNORE = -100


@dataclass(frozen=True)
class LossSpec:
    kind: str = "ce"  # one of LOSSES
    temperature: float = 2.0
    kd_weight: float = 0.5  # weight of the KD term in "ce+kd"
    chunk_tokens: int = CHUNK_TOKENS

    @property
    def weights(self) -> tuple[float, float]:
        """(weight of CE, weight of T^2 * KL)."""
        if self.kind == "ce":
            return 1.0, 0.0
        if self.kind == "kd":
            return 0.0, 1.0
        return 1.0 - self.kd_weight, self.kd_weight


@dataclass
class TeacherBatch:
    """The teacher's next-token distribution at the scored positions of one micro-batch, flattened
    like the student's (window-major, positions 0..T-2). Either `hidden` + `head` (full distribution,
    logits computed chunk by chunk) or `values` + `indices` + `lse` (top-k, see the module doc)."""

    hidden: torch.Tensor | None = None  # (N, H) the teacher's final hidden states
    head: nn.Module | None = None  # the teacher's output head
    values: torch.Tensor | None = None  # (N, k) top-k logits (fp16 on disk)
    indices: torch.Tensor | None = None  # (N, k) their token ids
    lse: torch.Tensor | None = None  # (N,) logsumexp over the full vocabulary of logits / T

    def rows(self, keep: torch.Tensor | None) -> TeacherBatch:
        if keep is None:
            return self
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return TeacherBatch(pick(self.hidden), self.head, pick(self.values), pick(self.indices), pick(self.lse))

    def slice(self, s: int, e: int) -> TeacherBatch:
        part = lambda t: None if t is None else t[s:e]  # noqa: E731
        return TeacherBatch(part(self.hidden), self.head, part(self.values), part(self.indices), part(self.lse))


@dataclass
class LossParts:
    """A micro-batch's loss (a tensor that backpropagates) and its parts as floats (token means)."""

    loss: torch.Tensor
    ce: float
    kd: float | None
    tokens: int


def kd_terms(z: torch.Tensor, teacher: TeacherBatch, temperature: float) -> torch.Tensor:
    """Summed T^2 * KL(teacher || student) over the rows of student logits `z` (n, V) fp32."""
    t = float(temperature)
    log_q = F.log_softmax(z / t, dim=-1)  # (n, V) student, full vocabulary
    if teacher.hidden is not None:  # the full teacher distribution
        tz = teacher.head(teacher.hidden).float()
        log_p = F.log_softmax(tz / t, dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum") * (t * t)
    idx = teacher.indices.long()
    log_p_k = teacher.values.float() / t - teacher.lse.float()[:, None]  # (n, k)
    log_q_k = log_q.gather(1, idx)
    p_k = log_p_k.exp()
    head = (p_k * (log_p_k - log_q_k)).sum()
    if idx.shape[1] >= z.shape[1]:  # k covers the vocabulary: no tail, the exact KL
        return head * (t * t)
    p_tail = (-torch.expm1(torch.logsumexp(log_p_k, dim=1))).clamp_min(0.0)  # 1 - top-k mass, stably
    log_q_tail = log_q.scatter(1, idx, float("-inf")).logsumexp(dim=1)  # the student's mass elsewhere
    tail = (torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail).sum()
    return (head + tail) * (t * t)


def head_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    spec: LossSpec,
    teacher: TeacherBatch | None = None,
) -> LossParts:
    """Mean loss over the rows of `hidden` (N, H) (final norm applied) against `labels` (N,), scored
    `spec.chunk_tokens` rows at a time through `head` (its parameters frozen)."""
    keep = labels != IGNORE
    if not bool(keep.all()):
        hidden, labels = hidden[keep], labels[keep]
        teacher = teacher.rows(keep) if teacher is not None else None
    n = labels.shape[0]
    w_ce, w_kd = spec.weights
    if w_kd and teacher is None:
        raise ValueError(f"loss {spec.kind!r} needs the teacher's distribution")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    grad = torch.empty_like(hidden) if need_grad else None
    ce_sum = torch.zeros((), dtype=torch.float64)
    kd_sum = torch.zeros((), dtype=torch.float64)
    for s in range(0, n, spec.chunk_tokens):
        e = min(n, s + spec.chunk_tokens)
        x = hidden[s:e].detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            z = head(x).float()  # (n, V): this chunk's logits only
            ce = F.cross_entropy(z if w_ce else z.detach(), labels[s:e], reduction="sum")  # reported always
            kd = kd_terms(z, teacher.slice(s, e), spec.temperature) if w_kd else z.new_zeros(())
            if need_grad:
                (grad[s:e],) = torch.autograd.grad(((w_ce * ce if w_ce else 0.0) + w_kd * kd) / max(n, 1), x)
        ce_sum += ce.detach().double().cpu()
        kd_sum += kd.detach().double().cpu()
        del z
    ce_mean, kd_mean = float(ce_sum) / max(n, 1), float(kd_sum) / max(n, 1)
    value = hidden.new_tensor(w_ce * ce_mean + w_kd * kd_mean, dtype=torch.float32)
    if need_grad:  # d(loss)/d(hidden) = grad: the surrogate carries it into the decoder's backward
        surrogate = (hidden * grad).sum().float()
        value = value + (surrogate - surrogate.detach())  # exactly zero in value, grad in backward
    return LossParts(value, ce_mean, kd_mean if w_kd else None, n)


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper (its decoder carries the adapters), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def chunked_head(model: nn.Module) -> nn.Module | None:
    """The output head to score in chunks, or None where logits are not exactly
    `lm_head(model.model(...))` (soft-capping, logit scaling) or the head trains: HF's own loss then."""
    base = causal_lm(model)
    head = linear_head(base)
    return head if head is not None and _frozen(head) else None


def micro_batch_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: LossSpec | None = None,
    teacher: TeacherBatch | None = None,
    labels: torch.Tensor | None = None,
) -> LossParts:
    """Loss of `model` (a PEFT-wrapped or plain LlamaForCausalLM-like model) on `input_ids` (B, T)
    predicting `labels` (default: the ids themselves) shifted by one. Call `.loss.backward()`."""
    spec = spec or LossSpec()
    labels = input_ids if labels is None else labels
    base = causal_lm(model)
    head = chunked_head(model)
    targets = labels[:, 1:].reshape(-1)
    if head is None:  # the model's own logits (whole micro-batch at once), the same loss terms
        logits = base(input_ids=input_ids, use_cache=False).logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        return head_loss(
            flat, nn.Identity(), targets, LossSpec(spec.kind, spec.temperature, spec.kd_weight, 1 << 62), teacher
        )
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H), final norm applied
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the last position predicts nothing
    return head_loss(hidden, head, targets, spec, teacher)
