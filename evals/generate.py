"""Batched greedy generation with left padding, stopping each row at the end of its first line.

Shared by the QA tasks and the generation samples. Prompts are sorted by length so a batch holds
prompts of similar size (little padding); results come back in the caller's order. A row stops at
end-of-sequence or, when `stop_at_newline`, at the first newline that follows some text, and then
leaves the batch (see `_decode`). The cancel flag is checked after every decoding step. The loop is
our own rather than `model.generate` only to drop finished rows; the model code is Hugging Face's.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from frankenlab.evals import devices
from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.packed import packed_linears

_TOKEN_CLASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_classes(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids whose text holds a newline, ids whose text is only whitespace), once per tokenizer."""
    try:
        return _TOKEN_CLASSES[tokenizer]
    except (KeyError, TypeError):
        pass
    newline, blank = [], []
    for i in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([i])
        if "\n" in text:
            newline.append(i)
        if not text.strip():
            blank.append(i)
    classes = torch.tensor(newline, dtype=torch.long), torch.tensor(blank, dtype=torch.long)
    try:
        _TOKEN_CLASSES[tokenizer] = classes
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return classes


def newline_token_ids(tokenizer) -> torch.Tensor:
    return token_classes(tokenizer)[0]


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (chat models often list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
    return sorted(ids)


@torch.inference_mode()
def _decode(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos: torch.Tensor,
    classes: tuple[torch.Tensor, torch.Tensor] | None,
    cancelled: Callable[[], bool] | None,
) -> list[list[int]]:
    """Greedy decoding of one left-padded batch. ids/mask: (B, T). Returns each row's new tokens.

    A row stops at end-of-sequence or, with `classes` (newline ids, whitespace-only ids), at the
    first newline that follows some text: newlines before any text do not end the answer (several
    models open "Answer:" with a line break; the answer is the line after it). Finished rows leave
    the batch and their KV cache rows are dropped, so one rambling row does not make the others
    pay for its 50 tokens.
    """
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions that skip the left padding
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    # transformers 5.x renamed the KV cache `past_key_values` -> `cache` (the old name warns, then goes)
    cache_kw = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    past = getattr(out, cache_kw)
    logits = out.logits[:, -1]  # (B, V)
    rows = torch.arange(ids.shape[0], device=ids.device)  # which original row each live row is
    last_pos = pos[:, -1]
    has_text = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for step in range(max_new_tokens):
        if step == 0 and eos.numel():  # at least one new token, as generate's min_new_tokens=1
            logits = logits.index_fill(-1, eos, float("-inf"))
        nxt = logits.argmax(-1)  # (live,)
        for r, t in zip(rows.tolist(), nxt.tolist(), strict=False):
            tokens[r].append(t)
        done = torch.isin(nxt, eos)
        if classes is not None:
            newline, blank = classes
            text_now = ~torch.isin(nxt, blank)
            done |= torch.isin(nxt, newline) & (has_text | text_now)
            has_text = has_text | text_now
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if cancelled and cancelled():
            raise Cancelled("generation cancelled")
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            past.batch_select_indices(keep)
            rows, mask, last_pos, has_text, nxt = rows[keep], mask[keep], last_pos[keep], has_text[keep], nxt[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            use_cache=True,
            **{cache_kw: past},
        )
        logits = out.logits[:, -1]
    return tokens


@dataclass
class Generation:
    prompt: str
    text: str  # everything generated (special tokens removed)
    new_tokens: int  # tokens generated before stopping (the stop token included)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def apply_chat(tokenizer, prompt: str) -> str:
    """The prompt as a single user turn in the model's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template was asked for but this tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def prompt_batches(
    tokenizer, prompts: list[str], *, batch_size: int = 8, max_prompt_tokens: int | None = None
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(caller's indices, ids, mask) per batch: prompts sorted by length, left padded. ids/mask: (B, T).

    Templates and tokenizers that add BOS themselves: a prompt that already starts with the
    tokenizer's BOS text is encoded without a second one. A prompt over `max_prompt_tokens` keeps
    its end (the question).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        tokenizer(p, add_special_tokens=not (tokenizer.bos_token and p.startswith(tokenizer.bos_token))).input_ids
        for p in prompts
    ]
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = []
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(encoded[i])
            ids[r, width - n :] = torch.tensor(encoded[i], dtype=torch.long)  # left padding
            mask[r, width - n :] = 1
        out.append((idx, ids, mask))
    return out


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 50,
    stop_at_newline: bool = True,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[Generation]:
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    device = _device(model)
    eos = torch.tensor(eos_ids(model, tokenizer), dtype=torch.long, device=device)
    classes = tuple(c.to(device) for c in token_classes(tokenizer)) if stop_at_newline else None
    out: list[Generation | None] = [None] * len(prompts)
    done = 0
    # CPU fp32: weights reordered once for oneDNN (evals.packed); at 8 rows per step the decoder's
    # linears took 41 instead of 70 ms per token on the bundled model's shapes
    halve, rows = devices.retry_smaller_batches(device), None
    with packed_linears(model):
        for idx, ids, mask in prompt_batches(
            tokenizer, prompts, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens
        ):
            if cancelled and cancelled():
                raise Cancelled("generation cancelled")
            if halve:  # a batch that does not fit is decoded in halves, each row as before (its padding kept)
                parts, rows = devices.halving_on_oom(
                    lambda b, e, ids=ids, mask=mask: _decode(
                        model, ids[b:e].to(device), mask[b:e].to(device), max_new_tokens, eos, classes, cancelled
                    ),
                    ids.shape[0],
                    device=device,
                    start=rows,
                )
                new = [row for part in parts for row in part]
            else:
                new = _decode(model, ids.to(device), mask.to(device), max_new_tokens, eos, classes, cancelled)
            for r, i in enumerate(idx):
                out[i] = Generation(prompts[i], tokenizer.decode(new[r], skip_special_tokens=True), len(new[r]))
            done += len(idx)
            if progress:
                progress(done / len(prompts))
    return out  # type: ignore[return-value]
