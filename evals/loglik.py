"""Log-likelihood of a continuation given a context, batched: what multiple-choice tasks score.

Tokenization follows lm-evaluation-harness' `HFLM._encode_pair`, so a number here is the number
the harness would compute: trailing spaces of the context move to the continuation, the pair is
encoded whole, and the continuation's tokens are what the whole has beyond the context's own
encoding (a merge across the boundary is counted on the continuation side). No BOS or other
special token is added (the harness' default for causal models).

Rows are left padded and sorted by length; only the last positions' logits are computed
(`logits_to_keep`), so the 49k-word output head runs on the continuation alone. On a GPU a batch
that runs out of memory is scored in halves, down to one row (`evals.devices.halving_on_oom`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from frankenlab.evals import devices
from frankenlab.evals.cancel import Cancelled


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def continuation_logprobs(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context, in the caller's order.

    A row longer than `max_length` (default: the model's max_position_embeddings) keeps its end,
    as the harness does."""
    device = next(model.parameters()).device
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    rows = []
    for ctx, cont in pairs:
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k or not c:
            raise ValueError(f"context {ctx[:40]!r} or continuation {cont[:40]!r} encodes to no token")
        full = (c + k)[-max_length:]
        rows.append((full, min(len(k), len(full) - 1)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    halve = devices.retry_smaller_batches(device)
    fits = None  # after an out of memory on a GPU: the rows per forward pass that fit

    def score(idx: list[int]) -> None:
        width = len(rows[idx[0]][0])
        keep = max(rows[i][1] for i in idx) + 1  # logits at the positions that predict continuation tokens
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            toks = rows[i][0]
            ids[r, width - len(toks) :] = torch.tensor(toks)
            mask[r, width - len(toks) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=pos.to(device),
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # (B, keep, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(idx):
            n = rows[i][1]
            target = ids[r, width - n :].to(device)  # the continuation's tokens, at the row's end
            scored = logp[r, keep - n - 1 : keep - 1]  # (n, V): position t predicts token t+1
            out[i] = float(scored.gather(1, target[:, None]).sum())

    done = 0
    for b in range(0, len(order), batch_size):
        if cancelled and cancelled():
            raise Cancelled("log-likelihood scoring cancelled")
        idx = order[b : b + batch_size]
        if halve:  # a batch that does not fit is scored in halves, down to one row (the same numbers)
            _, fits = devices.halving_on_oom(lambda s, e, idx=idx: score(idx[s:e]), len(idx), device=device, start=fits)
        else:
            score(idx)
        done += len(idx)
        if progress:
            progress(done / len(rows))
    return out
