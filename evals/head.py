"""The output head scored in vocabulary blocks: next-token NLL without a (tokens, vocab) logits matrix.

One implementation, shared by perplexity (`evals.perplexity.nll_sum`) and the what-if estimator
(`pipeline.whatif`). On small models with large vocabularies the head is a big share of a forward
pass (SmolLM2-135M: 49152 x 576, as much as ~7 of its 30 decoder layers), and the usual path
(full (B, T, V) logits, upcast, cross-entropy) sends that matrix through memory three times. Here
the vocabulary is scored `VOCAB_BLOCK` rows of the weight at a time with a running logsumexp,
so each (tokens, block) tile stays in cache; only positions that are scored reach the
head at all (no padding, no unscored prefix). Per-token values are float32 as before; sums are
taken in float64, which is closer to a float64 reference than float32 cross-entropy over full logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_BLOCK = 4096  # a (512, 4096) fp32 tile is 8 MiB: it stays in a server CPU's L3 instead of going to DRAM
HEAD_CHUNK_TOKENS = 512  # tokens per head call; bounds the tile to HEAD_CHUNK_TOKENS x VOCAB_BLOCK floats


def _logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(logits, dim=1) computed in place in the (N, b) tile, which it consumes: the same
    steps (row max, infinite maxima taken as 0, exp of the difference, sum, log, max added back), so
    the same values, without a second tile-sized tensor per block. Autograd keeps torch's."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.logsumexp(logits, dim=1)
    top = logits.amax(dim=1, keepdim=True)  # (N, 1)
    top.masked_fill_(top.abs() == math.inf, 0.0)
    return logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


def blocked_token_nll(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    block: int = VOCAB_BLOCK,
    linear=F.linear,
) -> torch.Tensor:
    """Per-token cross-entropy of logits x @ weight.T (+ bias) against labels, never holding all logits.

    x: (N, H), weight: (V, H), bias: (V,) or None, labels: (N,). Returns (N,) float32, equal to
    F.cross_entropy(x @ weight.T + bias, labels, reduction="none") up to float rounding. Each block's
    logsumexp is folded into a running one (`logaddexp`); the label's logit is one dot product per
    token. Few, large operations per block: on a busy machine every small operation pays for its
    threads to meet, which made 1024-wide blocks slower than full logits there. `linear` computes
    each block (`evals.packed.Packs.linear` during an evaluation: weights reordered once).
    """
    lse = None  # (N,) running logsumexp over the blocks seen so far
    x = x.float()  # a bf16/fp16 model (on a GPU): logits in fp32, like the label's logit below; fp32: no copy
    for v in range(0, weight.shape[0], block):
        w, b = weight[v : v + block].float(), None if bias is None else bias[v : v + block].float()  # one block
        logits = linear(x, w, b)  # (N, b)
        part = _logsumexp_rows(logits)  # (N,)
        lse = part if lse is None else torch.logaddexp(lse, part)
    target = (x.float() * weight[labels].float()).sum(dim=1)  # (N,) the label's logit
    if bias is not None:
        target = target + bias[labels].float()
    return lse - target


def blocked_nll(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, block: int = VOCAB_BLOCK
) -> float:
    """Summed cross-entropy of logits x @ weight.T (+ bias) against labels (see `blocked_token_nll`)."""
    return float(blocked_token_nll(x, weight, bias, labels, block).double().sum())


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The output projection if logits are exactly `lm_head(model.model(...).last_hidden_state)`.

    None where something else shapes the logits (soft-capping, logit scaling) or the head is not a
    plain `nn.Linear` (an adapter or a quantized kernel around it): callers then take the model's
    own logits.
    """
    from transformers import PreTrainedModel

    head = getattr(model, "lm_head", None)
    if (
        type(head) is not nn.Linear
        or not isinstance(model, PreTrainedModel)  # a PEFT wrapper is not
        or not isinstance(getattr(model, "model", None), PreTrainedModel)
    ):  # LlamaModel under LlamaForCausalLM
        return None
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        return None
    for name in ("logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return None
    return head


def head_token_nll(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK_TOKENS, linear=F.linear
) -> torch.Tensor:
    """Per-token NLL of `labels` (N,) from the decoder's final hidden states `hidden` (N, H), final norm applied.

    Blocked through `linear_head` where the model allows it, else through `model.lm_head` with full
    logits, `chunk` tokens at a time either way. Returns (N,) float32.
    """
    head = linear_head(model)
    out = []
    for s in range(0, hidden.shape[0], chunk):
        x, y = hidden[s : s + chunk], labels[s : s + chunk]  # (n, H), (n,)
        if head is not None:
            out.append(blocked_token_nll(x, head.weight, head.bias, y, linear=linear))
        else:
            out.append(F.cross_entropy(model.lm_head(x).float(), y, reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
