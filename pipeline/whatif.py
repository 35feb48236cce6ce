"""What-if layer skipping: perplexity of a layer plan on a small fixed slice, fast enough to toggle.

The lab's first question is "what does this layer cost?". Answering it with a full perplexity
pass per toggle takes seconds to minutes, so the estimator scores a small fixed slice (by default
the first 4 windows of 256 tokens of WikiText-2 test, joined as in `wikitext2-concat-256:first4`)
and reuses work. The hidden states entering each layer in the unmodified model are cached for the
slice; a plan that runs the same layers as the baseline up to position p restarts from the cached
input of position p instead of the embedding. Only the prefix is reusable exactly: after the first
difference every hidden state changes, so everything from there to the head is recomputed.

Three more reuses serve interactive editing, all exact:
- trails: the states of recently estimated plans are kept too (inside the same memory budget,
  least recently used first out), so editing a plan further along its depth restarts near the
  edit, not at the first difference from the unmodified model;
- memo: a plan estimated once answers instantly (`known`), e.g. toggling a cell back;
- cancelled work is not lost: states computed before a cancel stay in the trail.

The output head, which on small models with large vocabularies costs as much as several decoder
layers (SmolLM2: 49152 x 576, ~7 layers), is scored in vocabulary blocks with a running logsumexp
(`blocked_nll`): no (tokens, vocab) logits matrix, ~10-20 % faster, and closer to a float64
reference than float32 cross-entropy over full logits.

Memory is bounded by `max_cache_bytes`: when the baseline's states do not all fit, every k-th
position is kept as a checkpoint and a plan restarts from the nearest one at or before p.

The leave-one-out `scan` is the depth stage's perplexity importance metric (that stage calls it),
so the grid's heat colours and the layers depth pruning removes agree by construction.

Numbers are exact, not approximations: `estimate` equals `estimate_uncached` (a full forward of
the planned model through the evaluation code) up to float summation order.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evals.perplexity import Cancelled, Protocol, score_sequences, sequences_for

from .layerwise import capture_inputs, layer_hidden
from .models import decoder_layers
from .plans import LayerPlan, PlanError, PlanSlot, planned

DEFAULT_CACHE_BYTES = 256 * 2**20
HEAD_CHUNK_TOKENS = 1024  # tokens per head call; logits are then scored in vocabulary blocks
VOCAB_BLOCK = 1024  # (tokens, 1024) logits tiles stay in cache: faster than one (tokens, vocab) matrix
MEMO_SIZE = 4096
MAX_TRAILS = 8  # recent plans kept as restart points (besides the baseline), budget permitting

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


@dataclass
class _Trail:
    """Hidden states entering positions of one plan: states[p][b] is batch b's (B, T, H) input."""

    order: tuple[int, ...]
    pinned: bool = False  # the baseline's trail is never evicted
    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def best_restart(self, order: tuple[int, ...]) -> int:
        """The latest stored position whose state `order` shares (-1 if none)."""
        shared = 0
        for a, b in zip(self.order, order):
            if a != b:
                break
            shared += 1
        usable = [p for p in self.states if p <= shared and p <= len(order)]
        return max(usable, default=-1)


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _kwargs_bytes(kwargs: dict) -> int:
    total = 0
    for v in kwargs.values():
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


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
        self.max_cache_bytes = max_cache_bytes  # None = unbounded
        self.batch_size = max(1, batch_size)
        self._given_ids = ids
        self.protocol = (f"ids-{ids.shape[0]}x{ids.shape[1]}" if ids is not None
                         else Protocol(data, "concat", seq_len, limit=samples).name)
        self._lock = threading.RLock()
        self._memo_lock = threading.Lock()
        self._memo: OrderedDict[tuple[int, ...], Estimate] = OrderedDict()
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached state and answer (the model's weights changed)."""
        with self._lock:
            self.ids: torch.Tensor | None = self._given_ids
            self.source = "given ids" if self._given_ids is not None else ""
            self._layers: list[nn.Module] = []
            self._kwargs: list[dict] = []
            self._trails: OrderedDict[tuple[int, ...], _Trail] = OrderedDict()
            self._stride: int | None = None  # checkpoint every k-th position; None = nothing fits
            self._state_bytes = 0  # one position's states over all batches
            self._held = 0  # bytes of states in trails, kept as a counter so any thread may read it
            self._baseline_nll: tuple[float, int] | None = None
            self.baseline_ppl: float = math.nan
            with self._memo_lock:
                self._memo.clear()

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
        return self._held

    def cache_report(self) -> dict:
        """What the cache holds, for a status line: bytes, budget, checkpoint stride, plans."""
        base = self._trails.get(tuple(range(len(self._layers)))) if self._layers else None
        return {
            "bytes": self.cache_bytes,
            "budget": self.max_cache_bytes,
            "stride": self._stride,
            "baseline_positions": len(base.states) if base else 0,
            "layers": len(self._layers),
            "plans": max(0, len(self._trails) - 1),
            "memo": len(self._memo),
            "protocol": self.protocol,
            "tokens": self.tokens,
        }

    def status_line(self) -> str:
        """One line for the TUI: slice, baseline, cache memory against its budget."""
        base = f"baseline ppl {self.baseline_ppl:.2f}" if self.ready else "baseline not computed yet"
        budget = "unbounded" if self.max_cache_bytes is None else f"{self.max_cache_bytes / 2**20:.0f} MiB"
        return f"what-if on {self.protocol}: {base}; cache {self.cache_bytes / 2**20:.1f} MiB of {budget}"

    def known(self, plan: LayerPlan) -> Estimate | None:
        """The memoized estimate of `plan`, if it has been computed; never waits for a computation."""
        with self._memo_lock:
            return self._memo.get(plan.order)

    # -- set-up ------------------------------------------------------------------------------
    def _model_layers(self) -> list[nn.Module]:
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
        first = [c.hidden for c in captured]
        self._state_bytes = _bytes(first)
        self._held = sum(_kwargs_bytes(k) for k in self._kwargs)
        n = len(layers)
        room = None if self.max_cache_bytes is None else \
            (self.max_cache_bytes - self._held) // max(1, self._state_bytes)
        if room is None or room >= n:
            self._stride = 1
        elif room >= 1:
            self._stride = math.ceil(n / room)
        else:
            self._stride = None
        base = _Trail(tuple(range(n)), pinned=True)
        if self._stride is not None:
            base.states[0] = first
            self._held += self._state_bytes
        self._trails[base.order] = base
        self._layers = layers

    def prepare(self, cancelled: CancelFn = None) -> None:
        """Baseline pass and cache fill. Resumable: a cancelled prepare keeps what it computed."""
        with self._lock:
            if self.ready:
                return
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
    def _restart(self, order: tuple[int, ...]) -> tuple[int, list[torch.Tensor] | None, _Trail | None]:
        best, src = -1, None
        for trail in self._trails.values():
            p = trail.best_restart(order)
            if p > best:
                best, src = p, trail
        if src is None:
            return 0, None, None
        self._trails.move_to_end(src.order)
        return best, src.states[best], src

    def _make_room(self, keep: _Trail) -> bool:
        """Evict least recently used plans' states until one more position fits."""
        if self.max_cache_bytes is None:
            return True
        while self._held + self._state_bytes > self.max_cache_bytes:
            victim = next((t for t in self._trails.values() if not t.pinned and t is not keep), None)
            if victim is None:
                return False
            self._drop(victim)
        return True

    def _drop(self, trail: _Trail) -> None:
        self._trails.pop(trail.order, None)
        self._held -= self._state_bytes * len(trail.states)

    def _check(self, cancelled: CancelFn) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled("what-if estimate cancelled")

    @torch.inference_mode()
    def _compute(self, order: tuple[int, ...], cancelled: CancelFn, *, record: bool
                 ) -> tuple[float, int, int, bool]:
        """Summed NLL and token count of `order` on the slice, the restart position, whether cached."""
        start, x, _ = self._restart(order)
        reused = x is not None
        if x is None:  # nothing cached fits the budget: embed again
            x = [c.hidden for c in capture_inputs(self.model, self.ids, self.batch_size)]
        trail = None
        if record and self._stride is not None:
            trail = self._trails.get(order)
            if trail is None:
                while len(self._trails) > MAX_TRAILS:  # + the pinned baseline
                    self._drop(next(t for t in self._trails.values() if not t.pinned))
                trail = self._trails[order] = _Trail(order)
            self._trails.move_to_end(order)
        try:
            for pos in range(start, len(order)):
                self._check(cancelled)
                layer = self._layers[order[pos]]
                x = [layer_hidden(layer(h, use_cache=False, **kw)) for h, kw in zip(x, self._kwargs)]
                # x: (B, T, H) per batch, the input of position pos + 1
                nxt = pos + 1
                if (trail is not None and nxt < len(order) and nxt % self._stride == 0
                        and nxt not in trail.states and (trail.pinned or self._make_room(trail))):
                    trail.states[nxt] = x
                    self._held += self._state_bytes
            nll, count = self._head(x, cancelled)
        finally:
            if trail is not None and not trail.states and not trail.pinned:
                self._trails.pop(order, None)
        return nll, count, start, reused

    @torch.inference_mode()
    def _head(self, hidden: list[torch.Tensor], cancelled: CancelFn, *, blocked: bool = True
              ) -> tuple[float, int]:
        """Summed next-token NLL from the last layer's output, a few rows at a time (bounded logits)."""
        model, ids = self.model, self.ids
        device = hidden[0].device
        rows_per_chunk = max(1, HEAD_CHUNK_TOKENS // ids.shape[1])
        blocked = blocked and type(model.lm_head) is nn.Linear  # a plain projection: score vocabulary blocks
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

    def _head_seconds(self, blocked: bool = True, repeats: int = 3) -> float:
        """Median seconds of the output head and loss on the slice's final states (benchmarks print it);
        blocked=False times the usual full-logits cross-entropy instead."""
        with self._lock:
            self.prepare()
            base = self._trails[tuple(range(len(self._layers)))]
            x = base.states.get(len(self._layers) - 1) or base.states[max(base.states)]
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self._head(x, None, blocked=blocked)
                times.append(time.perf_counter() - t0)
            return sorted(times)[len(times) // 2]

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
            t1 = time.perf_counter()  # a first estimate also pays for prepare(); report only its own work
            nll, count, start, reused = self._compute(plan.order, cancelled, record=record)
            ppl = math.exp(nll / count)
            est = Estimate(ppl, ppl - self.baseline_ppl, time.perf_counter() - t1, start, plan.to_text(),
                           reused, self.protocol, len(plan) - start)
            self._remember(plan.order, est)
            return est

    def estimate_uncached(self, plan: LayerPlan, cancelled: CancelFn = None) -> Estimate:
        """Naive full recompute through the evaluation code (`planned` model, full forward).

        For tests and benchmarks: it swaps the model's layer list while it runs, so nothing else
        may use the model meanwhile.
        """
        self._check_plan(plan)
        with self._lock:
            self.prepare(cancelled)
            t0 = time.perf_counter()
            seqs = [(row, 0) for row in self.ids]
            with planned(self.model, plan):
                nll, count = score_sequences(self.model, seqs, batch_size=self.batch_size, cancelled=cancelled)
            ppl = math.exp(nll / count)
            return Estimate(ppl, ppl - self.baseline_ppl, time.perf_counter() - t0, 0, plan.to_text(), False,
                            self.protocol, len(plan))

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


def blocked_nll(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                block: int = VOCAB_BLOCK) -> float:
    """Summed cross-entropy of logits x @ weight.T (+ bias) against labels, never holding all logits.

    The vocabulary is scored `block` rows of `weight` at a time with a running (online) logsumexp,
    so each (N, block) logits tile stays in cache instead of a (N, V) matrix going through memory
    twice. Equal to F.cross_entropy(x @ weight.T + bias, labels, reduction="sum") up to float
    summation order; on SmolLM2's 49152 x 576 head with 1020 tokens it is ~20 % faster.
    x: (N, H), weight: (V, H), labels: (N,).
    """
    run_max = torch.full((x.shape[0],), -math.inf, device=x.device)  # (N,) running max of the logits
    run_sum = torch.zeros(x.shape[0], device=x.device)  # (N,) sum of exp(logit - run_max)
    target = torch.zeros(x.shape[0], device=x.device)  # (N,) the label's logit, taken from its block
    for v in range(0, weight.shape[0], block):
        logits = F.linear(x, weight[v:v + block], None if bias is None else bias[v:v + block]).float()  # (N, b)
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        run_max = new_max
        here = ((labels >= v) & (labels < v + logits.shape[1])).nonzero().squeeze(1)  # rows labelled in block
        target[here] = logits[here, labels[here] - v]
    return float((run_max + run_sum.log() - target).double().sum())


class EstimateScheduler:
    """"Latest wins" for the TUI: every submit (or scan) makes all earlier ones stale.

    Call `submit(plan)` from a thread worker; it blocks until the estimate is ready and returns it,
    or raises `evals.perplexity.Cancelled` once a newer submit, scan or `cancel()` has superseded
    it (within one decoder layer's time). Estimates run one at a time; a stale one gives up the
    model at its next layer boundary, and whatever it computed stays cached. Known plans are
    answered without waiting for a running estimate.
    """

    def __init__(self, estimator: WhatIfEstimator):
        self.estimator = estimator
        self._generation = 0
        self._mutex = threading.Lock()
        self._running = threading.Lock()
        # every computation runs on this one long-lived thread: torch's OpenMP team is then built once
        # and stays warm (a fresh thread per request measured ~8-18 % slower on 2 cores)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whatif")

    def _on_thread(self, fn, *args, **kwargs):
        return self._thread.submit(fn, *args, **kwargs).result()

    def _ticket(self) -> int:
        with self._mutex:
            self._generation += 1
            return self._generation

    def is_current(self, ticket: int) -> bool:
        return ticket == self._generation

    def cancel(self) -> None:
        """Make whatever is running or waiting stale (e.g. the screen closes)."""
        self._ticket()

    def prepare(self, cancelled: CancelFn = None) -> None:
        """The estimator's baseline pass on the scheduler's thread (the lab warms up with it)."""
        self._on_thread(self.estimator.prepare, cancelled)

    def _stale_fn(self, ticket: int, cancelled: CancelFn) -> Callable[[], bool]:
        return lambda: ticket != self._generation or bool(cancelled and cancelled())

    def _acquire(self, stale: Callable[[], bool]) -> None:
        while not self._running.acquire(timeout=0.02):
            if stale():
                raise Cancelled("superseded by a newer what-if request")
        if stale():
            self._running.release()
            raise Cancelled("superseded by a newer what-if request")

    def submit(self, plan: LayerPlan, cancelled: CancelFn = None) -> Estimate:
        stale = self._stale_fn(self._ticket(), cancelled)
        hit = self.estimator.known(plan)
        if hit is not None:
            return self.estimator.estimate(plan)  # memo answer with restarted_at/seconds filled in
        self._acquire(stale)
        try:
            return self._on_thread(self.estimator.estimate, plan, stale)
        finally:
            self._running.release()

    def scan(self, cancelled: CancelFn = None, layers: Iterable[int] | None = None
             ) -> Iterator[tuple[int, Estimate]]:
        """The estimator's scan, one layer at a time under the same latest-wins rule."""
        stale = self._stale_fn(self._ticket(), cancelled)
        self._acquire(stale)
        try:
            self._on_thread(self.estimator.prepare, stale)
            n = self.estimator.n_layers
        finally:
            self._running.release()
        if n < 2:
            return
        for i in (reversed(range(n)) if layers is None else list(layers)):
            plan = LayerPlan.without(n, [i])
            if self.estimator.known(plan) is None:
                self._acquire(stale)
                try:
                    est = self._on_thread(self.estimator.estimate, plan, stale, record=False)
                finally:
                    self._running.release()
            else:
                est = self.estimator.estimate(plan)
            if stale():
                raise Cancelled("superseded by a newer what-if request")
            yield i, est
