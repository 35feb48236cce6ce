"""Perplexity under named protocols.

Perplexity depends on how text is cut into sequences, so every number carries its protocol:
- `<data>-rows-<L>`: each dataset row is its own sequence, truncated to L tokens, padding masked,
  NLL summed over all valid predicted tokens (the thesis protocol, `wikitext2-rows-512`).
- `<data>-concat-<L>`: rows joined with "\\n\\n", cut into non-overlapping L-token windows (GPTQ and
  WANDA papers, `wikitext2-concat-512`); a stride < L gives overlapping windows that score only the
  tokens not seen by the previous window.
A sample limit is part of the name (`...:first16`), so partial numbers are never mistaken for full ones.
A named data set read from a file that is not the standard one (its sha256 differs from the shared
data folder's SHA256SUMS) gets `@sha256:<8 hex digits>` at the end of the label
(`wikitext2-concat-512@sha256:1a2b3c4d`), so a number on other data never passes for the standard one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from frankenlab.evals import devices
from frankenlab.evals.cancel import Cancelled, cancel_between_layers
from frankenlab.evals.data import data_label, load_texts
from frankenlab.evals.errors import DataError
from frankenlab.evals.head import head_token_nll, linear_head
from frankenlab.evals.malloc import reuse_freed_memory
from frankenlab.evals.packed import Packs, packed_linears
from frankenlab.evals.side_by_side import eval_workers, in_pool_thread, score_side_by_side

PROTOCOL_RE = re.compile(
    r"^(?P<data>.+)-(?P<mode>rows|concat)-(?P<length>\d+)"
    r"(?:-stride(?P<stride>\d+))?(?::first(?P<limit>\d+))?$"
)


@dataclass(frozen=True)
class Protocol:
    data: str  # dataset name ("wikitext2", "c4") or a file path
    mode: str  # "rows" | "concat"
    seq_len: int = 512
    stride: int | None = None  # concat only; None = seq_len (non-overlapping)
    limit: int | None = None  # rows or windows scored; None = all

    @classmethod
    def parse(cls, name: str, *, limit: int | None = None, stride: int | None = None) -> Protocol:
        m = PROTOCOL_RE.match(name)
        if not m:
            raise ValueError(
                f"unknown perplexity protocol {name!r}: use <data>-rows-<len> or <data>-concat-<len>, "
                "e.g. wikitext2-rows-512 or wikitext2-concat-512"
            )
        length = int(m["length"])
        stride = stride or (int(m["stride"]) if m["stride"] else None)
        limit = limit or (int(m["limit"]) if m["limit"] else None)
        if length < 2:
            raise ValueError(f"{name}: the sequence length must be at least 2 tokens")
        if stride is not None and not 1 <= stride <= length:
            raise ValueError(f"{name}: the stride must be between 1 and the sequence length ({length})")
        if m["mode"] == "rows" and stride not in (None, length):
            raise ValueError(f"{name}: a stride applies to concat protocols only")
        return cls(m["data"], m["mode"], length, stride, limit)

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
        return {
            "value": self.value,
            "protocol": self.protocol,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "seconds": self.seconds,
            "source": self.source,
        }


def concat_windows(
    tokenizer, texts: list[str], seq_len: int, stride: int | None = None, limit: int | None = None
) -> list[tuple[torch.Tensor, int]]:
    """(window ids, number of leading tokens not to score) for the joined text."""
    stride = stride or seq_len
    ids = _tokenize_prefix(tokenizer, "\n\n".join(texts), (limit - 1) * stride + seq_len if limit else None)
    out = []
    if stride == seq_len:
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            out.append((ids[start : start + seq_len], 0))
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


def _tokenize_prefix(tokenizer, text: str, needed: int | None) -> torch.Tensor:
    """Token ids of `text`, or of a prefix of it holding at least `needed` tokens.

    A sample limit scores only the first windows, so tokenizing the whole split (1.3 M characters
    for WikiText-2) would be wasted. The prefix is cut at a blank line and kept only if it yields a
    margin of tokens past `needed`: the ids we use are then exactly those of the full tokenization.
    """

    def encode(t: str) -> torch.Tensor:
        return tokenizer(t, return_tensors="pt", verbose=False).input_ids[0]

    if needed is None:
        return encode(text)
    chars = max(4096, needed * 8)
    while chars < len(text):
        cut = text.rfind("\n\n", 0, chars)
        cut = cut if cut > 0 else chars
        ids = encode(text[:cut])
        if ids.numel() >= needed + 64:
            return ids
        chars *= 2
    return encode(text)


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


BATCH_OVERHEAD_TOKENS = 32  # a forward's fixed cost (Python over the layers, small GEMMs) in padded tokens


def batch_cuts(lengths: list[int], budget: int, overhead: int = BATCH_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Batches [(start, end)) of rows sorted longest first, each within `budget` padded tokens, that
    minimise the padded tokens computed plus `overhead` per batch (dynamic programming over cut points).

    Filling each batch to the budget before starting the next (the obvious way) pads every row to
    the batch's first: on `wikitext2-rows-512:first64` of the bundled model's tokenizer that was
    15 % of the forward work. Exact: the cost is computed for every admissible last batch.
    """
    n = len(lengths)
    best = [0.0] * (n + 1)  # best[i]: cost of rows i.. ; best[n] = 0
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        width = lengths[i]
        most = max(1, budget // max(1, width))
        cost_i, cut_i = float("inf"), i + 1
        for j in range(i + 1, min(n, i + most) + 1):
            c = (j - i) * width + overhead + best[j]
            if c < cost_i:
                cost_i, cut_i = c, j
        best[i], cut[i] = cost_i, cut_i
    out, i = [], 0
    while i < n:
        out.append((i, cut[i]))
        i = cut[i]
    return out


def _batches(
    seqs: list[tuple[torch.Tensor, int]], batch_size: int, max_len: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Length-sorted, right-padded batches under a token budget of batch_size full-length sequences.

    Sorting keeps padding to a few tokens per row and `batch_cuts` places the cuts where they pad
    least; the budget lets many short rows (WikiText-2 has lots of headings) share one forward pass
    while memory stays that of `batch_size` long ones.
    Yields (ids, labels) with labels -100 where a token is padding or not scored.
    """
    budget = batch_size * max_len
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i][0].numel())
    for b, e in batch_cuts([seqs[i][0].numel() for i in order], budget):
        chunk = [seqs[i] for i in order[b:e]]
        width = chunk[0][0].numel()  # the longest in this batch: sorted descending
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (s, skip) in enumerate(chunk):
            n = s.numel()
            ids[r, :n] = s
            labels[r, max(skip, 1) : n] = s[max(skip, 1) :]  # the first token is never predicted
        yield ids, labels


@torch.inference_mode()
def nll_sum(model, ids: torch.Tensor, labels: torch.Tensor, packs: Packs | None = None) -> tuple[float, int]:
    """Summed next-token NLL over labelled positions and their count. ids/labels: (B, T), right padded.

    No attention mask is passed: with right padding and a causal model, no scored token can see a
    pad, so the result equals the masked one while attention keeps its fused causal path. Only the
    scored positions reach the output head, scored in vocabulary blocks (`evals.head`): no (B, T, V)
    logits are built. A head that is not a plain projection gets the model's own logits instead.
    `packs` (from `evals.packed.packed_linears`) computes the head's blocks on reordered weights.
    """
    shift_labels = labels[:, 1:].to(ids.device)  # (B, T-1): position t predicts token t+1
    keep = shift_labels != -100  # (B, T-1)
    if linear_head(model) is None:
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        scored = logits[:, :-1][keep].float()  # (N, V)
        return float(F.cross_entropy(scored, shift_labels[keep], reduction="sum")), int(keep.sum())
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H), final norm applied
    nll = head_token_nll(
        model, hidden[:, :-1][keep], shift_labels[keep], linear=packs.linear if packs is not None else F.linear
    )  # (N,)
    return float(nll.double().sum()), int(keep.sum())


def score_sequences(
    model,
    seqs: list[tuple[torch.Tensor, int]],
    *,
    batch_size: int = 4,
    pad_id: int = 0,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[float, int]:
    """Summed NLL and scored-token count of (ids, skip) sequences; cancel is checked between batches
    and between decoder layers.

    On a CPU two batches run side by side (`eval_workers`) with freed memory reused
    (`evals.malloc`); the sum is taken in batch order, so the result does not depend on which
    finishes first. `progress` and the return happen on the calling thread."""
    if not seqs:
        return 0.0, 0
    device = next(model.parameters()).device
    max_len = max(s.numel() for s, _ in seqs)
    batches = list(_batches(seqs, batch_size, max_len, pad_id))
    workers = eval_workers(device, len(batches))
    if in_pool_thread() or any(hasattr(m, "_hf_hook") for m in model.modules()):
        workers = 1  # inside a batch (never wait on our own pool), or accelerate's hooks move weights per call
    results: list[tuple[float, int] | None] = [None] * len(batches)
    on_cpu = devices.cpu_fast_paths(model)
    halve = devices.retry_smaller_batches(device)
    rows = None  # after an out of memory on a GPU: the rows per forward pass that fit
    with reuse_freed_memory(on_cpu), packed_linears(model) as packs:  # CPU fp32: weights reordered once
        if workers == 1:
            done = 0
            for i, (ids, labels) in enumerate(batches):
                if cancelled and cancelled():
                    raise Cancelled("perplexity cancelled")
                with cancel_between_layers(model, cancelled):
                    if halve:  # a batch that does not fit is scored in halves (the same sums)
                        parts, rows = devices.halving_on_oom(
                            lambda b, e, ids=ids, labels=labels: nll_sum(
                                model, ids[b:e].to(device), labels[b:e], packs
                            ),
                            ids.shape[0],
                            device=device,
                            start=rows,
                        )
                        results[i] = (sum(p[0] for p in parts), sum(p[1] for p in parts))
                    else:
                        results[i] = nll_sum(model, ids.to(device), labels, packs)
                done += ids.shape[0]
                if progress:
                    progress(done / len(seqs))
        else:
            score_side_by_side(
                model,
                batches,
                results,
                lambda ids, labels: nll_sum(model, ids, labels, packs),
                workers,
                len(seqs),
                progress,
                cancelled,
            )
    return sum(r[0] for r in results), sum(r[1] for r in results)  # in batch order, as one loop adds


def is_file_protocol(data: str) -> bool:
    return Path(data).suffix in (".txt", ".jsonl", ".gz", ".json", ".md", ".text") or Path(data).is_file()


def sequences_for(protocol: Protocol, tokenizer, *, data_dir=None) -> tuple[list[tuple[torch.Tensor, int]], str]:
    if is_file_protocol(protocol.data):
        path = Path(protocol.data).expanduser()
        if protocol.mode == "concat" and ".json" not in path.suffixes and path.suffix != ".gz" and path.is_file():
            # a plain text file is scored as written; joining its lines with "\n\n" would change it
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): is this the right file?"
                ) from None
            return concat_windows(tokenizer, [text], protocol.seq_len, protocol.stride, protocol.limit), str(path)
        texts, source = load_texts("file", path=path)
    else:
        texts, source = load_texts(protocol.data, data_dir=data_dir)
    if protocol.mode == "concat":
        return concat_windows(tokenizer, texts, protocol.seq_len, protocol.stride, protocol.limit), source
    return [(s, 0) for s in row_sequences(tokenizer, texts, protocol.seq_len, protocol.limit)], source


def perplexity(
    model,
    tokenizer,
    protocol: str | Protocol = "wikitext2-concat-512",
    *,
    data_dir=None,
    limit: int | None = None,
    batch_size: int = 4,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> PerplexityResult:
    if isinstance(protocol, str):
        protocol = Protocol.parse(protocol, limit=limit)
    t0 = time.perf_counter()
    seqs, source = sequences_for(protocol, tokenizer, data_dir=data_dir)
    if not seqs:
        raise ValueError(f"{protocol.name}: no sequence to score (text too short for length {protocol.seq_len}?)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, n = score_sequences(model, seqs, batch_size=batch_size, pad_id=pad, progress=progress, cancelled=cancelled)
    label = protocol.name + data_label(protocol.data, source)  # "@sha256:..." unless the standard data
    return PerplexityResult(math.exp(nll / n), label, n, len(seqs), time.perf_counter() - t0, source)


def perplexity_of_ids(model, batches: Iterable[torch.Tensor], *, cancelled=None) -> float:
    """Perplexity of pre-tokenized equal-length sequences (calibration text), e.g. for layer ranking."""
    seqs = [(row, 0) for batch in batches for row in batch]
    nll, n = score_sequences(model, seqs, batch_size=8, cancelled=cancelled)
    return math.exp(nll / n)
