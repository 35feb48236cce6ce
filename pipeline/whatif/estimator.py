"""The what-if estimator: perplexity of a layer plan on a small fixed slice, restarting from cached states.

The hidden states entering each layer are cached (`cache.StateCache`); a plan that runs the same
layers as a cached trail up to position p restarts from the cached input of position p instead
of the embedding. Only the prefix is reusable exactly: after the first difference every hidden
state changes, so everything from there to the head is recomputed. A plan estimated once is
answered from a memo (`known`), and states computed before a cancel stay in the cache.

The output head, which on small models with large vocabularies costs as much as several decoder
layers (SmolLM2: 49152 x 576, ~7 layers), is scored in vocabulary blocks with a running logsumexp
(`evals.perplexity.blocked_nll`): no (tokens, vocab) logits matrix, ~10-20 % faster, and closer
to a float64 reference than float32 cross-entropy over full logits.

The model is borrowed, not owned: every computation holds `pipeline.sharing.model_lock(model)`,
so a chat or a footprint on the same model waits for the layer boundary and never sees a plan.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evals.perplexity import Cancelled, Protocol, blocked_nll, sequences_for

from ..layerwise import capture_inputs, layer_hidden
from ..models import decoder_layers
from ..plans import LayerPlan, PlanError, PlanSlot
from ..sharing import borrowed, model_lock
from .cache import StateCache, kwargs_bytes

DEFAULT_CACHE_BYTES = 256 * 2**20
HEAD_CHUNK_TOKENS = 1024  # tokens per head call; logits are then scored in vocabulary blocks
MEMO_SIZE = 4096

CancelFn = Callable[[], bool] | None


@dataclass(frozen=True)
class Estimate:
    """Perplexity of one plan on the estimator's slice, and what it took."""

    ppl: float
    delta: float  # ppl - baseline ppl (positive = worse than the unmodified model)
    seconds: float
    restarted_at: int  # plan position computation restarted from (len(plan) = answered from memo)
    plan_text: str
    cached: bool  # reused cached states (False: naive full recompute)
    protocol: str = ""  # e.g. "wikitext2-concat-256:first4"; print it next to the number
    layers_run: int = 0  # decoder layers actually computed for this answer

    @property
    def baseline(self) -> float:
        return self.ppl - self.delta

    @property
    def relative(self) -> float:
        """Delta as a fraction of the baseline perplexity (0.1 = 10 % worse)."""
        return self.delta / self.baseline if self.baseline else math.inf


class WhatIfEstimator:
    """Perplexity of layer plans on a fixed slice, restarting from cached baseline states.

    Thread-safe: computations are serialized by an internal lock, `known` never waits for one.
    The model's weights must not change while an estimator is in use: call `reset()` after a
    stage modifies them (or build a new estimator).
    """

    def __init__(self, model: nn.Module, tokenizer, *, data: str = "wikitext2", samples: int = 4,
                 seq_len: int = 256, data_dir=None, max_cache_bytes: int | None = DEFAULT_CACHE_BYTES,
                 ids: torch.Tensor | None = None, batch_size: int = 8):
        if ids is not None and (ids.dim() != 2 or ids.shape[1] < 2):
            raise ValueError(f"ids must be (sequences, tokens) with at least 2 tokens, got {tuple(ids.shape)}")
        if samples < 1 or seq_len < 2:
            raise ValueError("the what-if slice needs at least 1 sample of at least 2 tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.data, self.samples, self.seq_len, self.data_dir = data, samples, seq_len, data_dir
        self.batch_size = max(1, batch_size)
        self._given_ids = ids
        self.protocol = (f"ids-{ids.shape[0]}x{ids.shape[1]}" if ids is not None
                         else Protocol(data, "concat", seq_len, limit=samples).name)
        self._lock = threading.RLock()
        self._memo_lock = threading.Lock()
        self._memo: OrderedDict[tuple[int, ...], Estimate] = OrderedDict()
        self._cache = StateCache(max_cache_bytes)
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached state and answer (the model's weights changed)."""
        with self._lock:
            self.ids: torch.Tensor | None = self._given_ids
            self.source = "given ids" if self._given_ids is not None else ""
            self._layers: list[nn.Module] = []
            self._kwargs: list[dict] = []
            self._cache.clear()
            self._baseline_nll: tuple[float, int] | None = None
            self.baseline_ppl: float = math.nan
            with self._memo_lock:
                self._memo.clear()

    @property
    def max_cache_bytes(self) -> int | None:
        """The budget for cached states and layer arguments (None = unbounded)."""
        return self._cache.max_bytes

    @property
    def n_layers(self) -> int:
        return len(self._layers) if self._layers else len(self._model_layers())

    @property
    def ready(self) -> bool:
        return self._baseline_nll is not None

    @property
    def tokens(self) -> int:
        """Tokens scored per estimate."""
        return 0 if self.ids is None else self.ids.shape[0] * (self.ids.shape[1] - 1)

    @property
    def cache_bytes(self) -> int:
        """Memory held by cached hidden states and the per-batch layer arguments."""
        return self._cache.held

    def cache_report(self) -> dict:
        """What the cache holds, for a status line: bytes, budget, checkpoint stride, plans."""
        base = self._cache.baseline
        return {
            "bytes": self.cache_bytes,
            "budget": self.max_cache_bytes,
            "stride": self._cache.stride,
            "state_bytes": self._cache.state_bytes,  # one position's hidden states, all batches
            "baseline_positions": len(base.states) if base else 0,
            "layers": len(self._layers),
            "plans": max(0, len(self._cache.trails) - 1),
            "memo": len(self._memo),
            "protocol": self.protocol,
            "tokens": self.tokens,
        }

    def known(self, plan: LayerPlan) -> Estimate | None:
        """The memoized estimate of `plan`, if it has been computed; never waits for a computation."""
        with self._memo_lock:
            return self._memo.get(plan.order)

    # -- set-up ------------------------------------------------------------------------------
    def _model_layers(self) -> list[nn.Module]:
        with model_lock(self.model):  # not while someone else runs it under a plan
            layers = list(decoder_layers(self.model))
        if any(isinstance(m, PlanSlot) for m in layers):
            raise PlanError("a run-time plan is applied to the model; restore it before estimating")
        return layers

    def _load_ids(self) -> torch.Tensor:
        proto = Protocol(self.data, "concat", self.seq_len, limit=self.samples)
        seqs, self.source = sequences_for(proto, self.tokenizer, data_dir=self.data_dir)
        if not seqs:
            raise ValueError(f"{proto.name}: the text is shorter than one window of {self.seq_len} tokens")
        if len(seqs) < self.samples:
            self.protocol = Protocol(self.data, "concat", self.seq_len, limit=len(seqs)).name
        return torch.stack([w for w, _ in seqs])

    @torch.inference_mode()
    def _setup(self) -> None:
        """Slice, layer arguments, embedding output and the checkpoint stride (cheap)."""
        if self._layers:
            return
        if self.ids is None:
            self.ids = self._load_ids()
        layers = self._model_layers()
        captured = capture_inputs(self.model, self.ids, self.batch_size)
        self._kwargs = [c.kwargs for c in captured]
        self._cache.configure(len(layers), [c.hidden for c in captured],
                              sum(kwargs_bytes(k) for k in self._kwargs))
        self._layers = layers

    def prepare(self, cancelled: CancelFn = None) -> None:
        """Baseline pass and cache fill. Resumable: a cancelled prepare keeps what it computed."""
        with self._lock:
            if self.ready:
                return
            with borrowed(self.model, cancelled):
                self._setup()
                t0 = time.perf_counter()
                order = tuple(range(len(self._layers)))
                nll, count, start, reused = self._compute(order, cancelled, record=True)
            self._baseline_nll = (nll, count)
            self.baseline_ppl = math.exp(nll / count)
            self._remember(order, Estimate(self.baseline_ppl, 0.0, time.perf_counter() - t0, start,
                                           LayerPlan(order, len(order)).to_text(), reused, self.protocol,
                                           len(order) - start))

    # -- computing ---------------------------------------------------------------------------
    def _check(self, cancelled: CancelFn) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled("what-if estimate cancelled")

    @torch.inference_mode()
    def _compute(self, order: tuple[int, ...], cancelled: CancelFn, *, record: bool
                 ) -> tuple[float, int, int, bool]:
        """Summed NLL and token count of `order` on the slice, the restart position, whether cached."""
        start, x = self._cache.restart(order)
        reused = x is not None
        if x is None:  # nothing cached fits the budget: embed again
            x = [c.hidden for c in capture_inputs(self.model, self.ids, self.batch_size)]
        trail = self._cache.trail_for(order) if record else None
        try:
            for pos in range(start, len(order)):
                self._check(cancelled)
                layer = self._layers[order[pos]]
                x = [layer_hidden(layer(h, use_cache=False, **kw)) for h, kw in zip(x, self._kwargs)]
                self._cache.offer(trail, pos + 1, x)  # x: (B, T, H) per batch, the input of position pos + 1
            nll, count = self._head(x, cancelled)
        finally:
            self._cache.release(trail)
        return nll, count, start, reused

    @torch.inference_mode()
    def _head(self, hidden: list[torch.Tensor], cancelled: CancelFn) -> tuple[float, int]:
        """Summed next-token NLL from the last layer's output, a few rows at a time (bounded logits)."""
        model, ids = self.model, self.ids
        device = hidden[0].device
        rows_per_chunk = max(1, HEAD_CHUNK_TOKENS // ids.shape[1])
        blocked = type(model.lm_head) is nn.Linear  # a plain projection: score vocabulary blocks
        total, count, row = 0.0, 0, 0
        for h in hidden:
            for r in range(0, h.shape[0], rows_per_chunk):
                self._check(cancelled)
                part = h[r:r + rows_per_chunk, :-1]  # (b, T-1, H): the last position predicts nothing
                labels = ids[row:row + part.shape[0], 1:].to(device)  # (b, T-1)
                row += part.shape[0]
                x = model.model.norm(part).reshape(-1, part.shape[-1])  # (N, H)
                if blocked:
                    total += blocked_nll(x, model.lm_head.weight, model.lm_head.bias, labels.reshape(-1))
                else:
                    logits = model.lm_head(x).float()  # (N, V)
                    total += float(F.cross_entropy(logits, labels.reshape(-1), reduction="sum"))
                count += labels.numel()
        return total, count

    def _remember(self, order: tuple[int, ...], est: Estimate) -> None:
        with self._memo_lock:
            self._memo[order] = est
            self._memo.move_to_end(order)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)

    def _check_plan(self, plan: LayerPlan) -> None:
        n = self.n_layers
        if plan.n_source != n:
            raise PlanError(f"the plan is for {plan.n_source} layers but the model has {n}")

    # -- the API -----------------------------------------------------------------------------
    def estimate(self, plan: LayerPlan, cancelled: CancelFn = None, *, record: bool = True,
                 use_memo: bool = True) -> Estimate:
        """Perplexity of `plan` on the slice and its delta to the unmodified model.

        Raises `evals.perplexity.Cancelled` when `cancelled()` turns true (checked before every
        layer). `record=False` keeps this plan's states out of the cache (the scan uses it so it
        does not push out the user's recent plans); `use_memo=False` recomputes a known plan.
        """
        self._check_plan(plan)
        t0 = time.perf_counter()
        if use_memo and (hit := self.known(plan)) is not None:
            return replace(hit, seconds=time.perf_counter() - t0, restarted_at=len(plan), layers_run=0)
        with self._lock:
            self.prepare(cancelled)
            with borrowed(self.model, cancelled):
                t1 = time.perf_counter()  # a first estimate also pays for prepare(); report only its own work
                nll, count, start, reused = self._compute(plan.order, cancelled, record=record)
            ppl = math.exp(nll / count)
            est = Estimate(ppl, ppl - self.baseline_ppl, time.perf_counter() - t1, start, plan.to_text(),
                           reused, self.protocol, len(plan) - start)
            self._remember(plan.order, est)
            return est

    def scan(self, cancelled: CancelFn = None, layers: Iterable[int] | None = None
             ) -> Iterator[tuple[int, Estimate]]:
        """Leave-one-out estimate for each layer, yielded as it is computed.

        Default order is last layer first: leaving out layer i restarts at i, so late layers are
        cheapest and the first results arrive at once. Results are memoized, so a scan that was
        cancelled (or interrupted by a toggle) resumes instantly where it stopped.
        """
        self.prepare(cancelled)
        n = len(self._layers)
        if n < 2:
            return
        for i in (reversed(range(n)) if layers is None else layers):
            yield i, self.estimate(LayerPlan.without(n, [i]), cancelled, record=False)
