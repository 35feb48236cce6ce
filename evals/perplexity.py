"""Perplexity under named protocols.

Perplexity depends on how text is cut into sequences, so every number carries its protocol:
- `<data>-rows-<L>`: each dataset row is its own sequence, truncated to L tokens, padding masked,
  NLL summed over all valid predicted tokens (the thesis protocol, `wikitext2-rows-512`).
- `<data>-concat-<L>`: rows joined with "\\n\\n", cut into non-overlapping L-token windows (GPTQ and
  WANDA papers, `wikitext2-concat-512`); a stride < L gives overlapping windows that score only the
  tokens not seen by the previous window.
A sample limit is part of the name (`...:first16`), so partial numbers are never mistaken for full ones.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .data import load_texts

PROTOCOL_RE = re.compile(r"^(?P<data>.+)-(?P<mode>rows|concat)-(?P<length>\d+)$")


class Cancelled(Exception):
    """Raised between batches when the caller's cancel flag is set."""


@dataclass(frozen=True)
class Protocol:
    data: str  # dataset name ("wikitext2", "c4") or a file path
    mode: str  # "rows" | "concat"
    seq_len: int = 512
    stride: int | None = None  # concat only; None = seq_len (non-overlapping)
    limit: int | None = None  # rows or windows scored; None = all

    @classmethod
    def parse(cls, name: str, *, limit: int | None = None, stride: int | None = None) -> "Protocol":
        m = PROTOCOL_RE.match(name)
        if not m:
            raise ValueError(f"unknown perplexity protocol {name!r}: use <data>-rows-<len> or <data>-concat-<len>, "
                             "e.g. wikitext2-rows-512 or wikitext2-concat-512")
        return cls(m["data"], m["mode"], int(m["length"]), stride, limit)

    @property
    def name(self) -> str:
        data = Path(self.data).name if ("/" in self.data or "." in self.data) else self.data
        s = f"{data}-{self.mode}-{self.seq_len}"
        if self.stride and self.stride != self.seq_len:
            s += f"-stride{self.stride}"
        if self.limit:
            s += f":first{self.limit}"
        return s


@dataclass
class PerplexityResult:
    value: float
    protocol: str
    tokens: int
    sequences: int
    seconds: float
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"value": self.value, "protocol": self.protocol, "tokens": self.tokens,
                "sequences": self.sequences, "seconds": self.seconds, "source": self.source}


def concat_windows(tokenizer, texts: list[str], seq_len: int, stride: int | None = None,
                   limit: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """(window ids, number of leading tokens not to score) for the joined text."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    stride = stride or seq_len
    out = []
    if stride == seq_len:
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            out.append((ids[start:start + seq_len], 0))
            if limit and len(out) >= limit:
                break
        return out
    prev_end = 0
    for start in range(0, ids.numel(), stride):
        end = min(start + seq_len, ids.numel())
        window = ids[start:end]
        if window.numel() < 2:
            break
        out.append((window, max(0, prev_end - start)))
        prev_end = end
        if end == ids.numel() or (limit and len(out) >= limit):
            break
    return out


def row_sequences(tokenizer, texts: list[str], seq_len: int, limit: int | None = None) -> list[torch.Tensor]:
    out = []
    for t in texts:
        if not t.strip():
            continue  # empty rows hold no tokens to score
        ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=seq_len).input_ids[0]
        if ids.numel() >= 2:
            out.append(ids)
        if limit and len(out) >= limit:
            break
    return out


def _batches(seqs: list[tuple[torch.Tensor, int]], batch_size: int, pad_id: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-sorted batches (little padding), right padded; labels -100 where not scored."""
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i][0].numel())
    for b in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[b:b + batch_size]]
        width = max(s.numel() for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (s, skip) in enumerate(chunk):
            n = s.numel()
            ids[r, :n], mask[r, :n] = s, 1
            labels[r, max(skip, 1):n] = s[max(skip, 1):]  # the first token is never predicted
        yield ids, mask, labels


@torch.inference_mode()
def nll_sum(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over labelled positions and their count. ids/mask/labels: (B, T)."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    shift_logits = logits[:, :-1].float()  # (B, T-1, V) predicts tokens 1..T-1
    shift_labels = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return float(loss), int((shift_labels != -100).sum())


def score_sequences(model, seqs: list[tuple[torch.Tensor, int]], *, batch_size: int = 4, pad_id: int = 0,
                    progress: Callable[[float], None] | None = None,
                    cancelled: Callable[[], bool] | None = None) -> tuple[float, int]:
    device = next(model.parameters()).device
    total_nll, total_tok, done = 0.0, 0, 0
    for ids, mask, labels in _batches(seqs, batch_size, pad_id):
        if cancelled and cancelled():
            raise Cancelled("perplexity cancelled")
        nll, n = nll_sum(model, ids.to(device), mask.to(device), labels)
        total_nll += nll
        total_tok += n
        done += ids.shape[0]
        if progress:
            progress(done / len(seqs))
    return total_nll, total_tok


def sequences_for(protocol: Protocol, tokenizer, *, data_dir=None) -> tuple[list[tuple[torch.Tensor, int]], str]:
    is_file = Path(protocol.data).suffix in (".txt", ".jsonl", ".gz", ".json")
    texts, source = load_texts(protocol.data if not is_file else "file",
                               path=protocol.data if is_file else None, data_dir=data_dir)
    if protocol.mode == "concat":
        return concat_windows(tokenizer, texts, protocol.seq_len, protocol.stride, protocol.limit), source
    return [(s, 0) for s in row_sequences(tokenizer, texts, protocol.seq_len, protocol.limit)], source


def perplexity(model, tokenizer, protocol: str | Protocol = "wikitext2-concat-512", *, data_dir=None,
               limit: int | None = None, batch_size: int = 4,
               progress: Callable[[float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> PerplexityResult:
    if isinstance(protocol, str):
        protocol = Protocol.parse(protocol, limit=limit)
    t0 = time.perf_counter()
    seqs, source = sequences_for(protocol, tokenizer, data_dir=data_dir)
    if not seqs:
        raise ValueError(f"{protocol.name}: no sequence to score (text too short for length {protocol.seq_len}?)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, n = score_sequences(model, seqs, batch_size=batch_size, pad_id=pad, progress=progress, cancelled=cancelled)
    return PerplexityResult(math.exp(nll / n), protocol.name, n, len(seqs), time.perf_counter() - t0, source)


def perplexity_of_ids(model, batches: Iterable[torch.Tensor], *, cancelled=None) -> float:
    """Perplexity of pre-tokenized equal-length sequences (calibration text), e.g. for layer ranking."""
    seqs = [(row, 0) for batch in batches for row in batch]
    nll, n = score_sequences(model, seqs, batch_size=8, cancelled=cancelled)
    return math.exp(nll / n)
