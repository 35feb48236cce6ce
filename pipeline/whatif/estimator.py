"""The what-if estimator: perplexity of a layer plan on a small fixed slice, restarting from cached states.

The hidden states entering each layer are cached (`cache.StateCache`); a plan that runs the same
layers as a cached trail up to position p restarts from the cached input of position p instead
of the embedding. Only the prefix is reusable exactly: after the first difference every hidden
state changes, so everything from there to the head is recomputed. A plan estimated once is
answered from a memo (`known`), and states computed before a cancel stay in the cache.

The output head, which on small models with large vocabularies costs as much as several decoder
layers (SmolLM2: 49152 x 576, ~7 layers), is scored in vocabulary blocks (`evals.head`, the same
code perplexity evaluation uses): no (tokens, vocab) logits matrix.

Progressive answers (`estimate(..., on_partial=...)`): the slice's first `coarse_rows` samples form
their own batch and go through the plan first; their estimate (coverage and standard error, see
`progressive`) is handed out, then the rest of the slice refines it to the exact number. Per-batch
results are memoized, so work done for a first answer is never redone for the exact one (the
scan's coarse pass included).

The model is borrowed, not owned: every computation holds `pipeline.sharing.model_lock(model)`,
so a chat or a footprint on the same model waits for the layer boundary and never sees a plan.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
from torch import nn

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.head import head_token_nll
from frankenlab.evals.perplexity import Protocol, sequences_for
from frankenlab.pipeline.layerwise import capture_inputs, layer_hidden
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.plans import LayerPlan, PlanError, PlanSlot
from frankenlab.pipeline.sharing import borrowed, model_lock
from frankenlab.pipeline.whatif.cache import StateCache, kwargs_bytes
from frankenlab.pipeline.whatif.oom import retry_on_oom
from frankenlab.pipeline.whatif.progressive import Estimate, partial_ppl

DEFAULT_CACHE_BYTES = 256 * 2**20
MEMO_SIZE = 4096
PART_MEMO_SIZE = 1024  # plans whose per-batch results (per-token NLL, 4 KiB for 1020 tokens) are kept

CancelFn = Callable[[], bool] | None


class WhatIfEstimator:
    """Perplexity of layer plans on a fixed slice, restarting from cached baseline states.

    Thread-safe: computations are serialized by an internal lock, `known` never waits for one.
    The model's weights must not change while an estimator is in use: call `reset()` after a
    stage modifies them (or build a new estimator).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        data: str = "wikitext2",
        samples: int = 4,
        seq_len: int = 256,
        data_dir=None,
        max_cache_bytes: int | None = DEFAULT_CACHE_BYTES,
        ids: torch.Tensor | None = None,
        batch_size: int = 8,
        coarse_rows: int = 1,
    ):
        if ids is not None and (ids.dim() != 2 or ids.shape[1] < 2):
            raise ValueError(f"ids must be (sequences, tokens) with at least 2 tokens, got {tuple(ids.shape)}")
        if samples < 1 or seq_len < 2:
            raise ValueError("the what-if slice needs at least 1 sample of at least 2 tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.data, self.samples, self.seq_len, self.data_dir = data, samples, seq_len, data_dir
        self.batch_size = max(1, batch_size)
        self.coarse_rows = max(0, coarse_rows)  # samples in the first answer (0: no progressive answers)
        self._given_ids = ids
        self.protocol = (
            f"ids-{ids.shape[0]}x{ids.shape[1]}"
            if ids is not None
            else Protocol(data, "concat", seq_len, limit=samples).name
        )
        self._lock = threading.RLock()
        self._memo_lock = threading.Lock()
        self._memo: OrderedDict[tuple[int, ...], Estimate] = OrderedDict()
        # per plan, per batch: (rows, T-1) per-token NLL; a plan's estimate is the sum over its batches
        self._parts: OrderedDict[tuple[int, ...], dict[int, torch.Tensor]] = OrderedDict()
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
            self._groups: list[list[int]] = []  # batches by part of the slice: the first answer's, the rest
            self._batch_rows: list[int] = []  # samples per batch
            self._base_parts: dict[int, torch.Tensor] = {}
            self._cache.clear()
            self._baseline_nll: tuple[float, int] | None = None
            self.baseline_ppl: float = math.nan
            with self._memo_lock:
                self._memo.clear()
                self._parts.clear()

    @property
    def max_cache_bytes(self) -> int | None:
        """The budget for cached states and layer arguments (None = unbounded)."""
        return self._cache.max_bytes

    @property
    def n_layers(self) -> int:
        return len(self._layers) if self._layers else len(self._model_layers())

    @property
    def parts(self) -> int:
        """Parts the slice is computed in: 2 when a first answer comes from its first samples, else 1."""
        return len(self._groups) if self._layers else (2 if 0 < self.coarse_rows < self.samples else 1)

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

    def _split(self) -> list[torch.Tensor]:
        """The slice's rows as the first answer's part and the rest (one part if it cannot be split)."""
        k = self.coarse_rows
        return [self.ids[:k], self.ids[k:]] if 0 < k < self.ids.shape[0] else [self.ids]

    def _embed(self) -> list:
        """Inputs of layer 0, batch by batch: each part in batches of at most `batch_size` samples."""
        return [c for part in self._split() for c in capture_inputs(self.model, part, self.batch_size)]

    @torch.inference_mode()
    def _setup(self) -> None:
        """Slice, layer arguments, embedding output and the checkpoint stride (cheap)."""
        if self._layers:
            return
        if self.ids is None:
            self.ids = self._load_ids()
        layers = self._model_layers()
        captured = self._embed()
        self._kwargs = [c.kwargs for c in captured]
        self._batch_rows = [c.hidden.shape[0] for c in captured]
        parts = self._split()
        first = -(-parts[0].shape[0] // self.batch_size) if len(parts) > 1 else len(captured)  # batches of part 0
        self._groups = [g for g in (list(range(first)), list(range(first, len(captured)))) if g]
        self._cache.configure(len(layers), [c.hidden for c in captured], sum(kwargs_bytes(k) for k in self._kwargs))
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
                start, reused = self._compute(order, [list(range(len(self._kwargs)))], cancelled, record=True)
            self._base_parts = self._parts_of(order)
            nll = self._sum(self._base_parts)
            self._baseline_nll = (nll, self.tokens)
            self.baseline_ppl = math.exp(nll / self.tokens)
            plan = LayerPlan(order, len(order))
            self._remember(order, self._make(plan, self._base_parts, time.perf_counter() - t0, start, reused))

    # -- computing ---------------------------------------------------------------------------
    def _check(self, cancelled: CancelFn) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled("what-if estimate cancelled")

    @torch.inference_mode()
    def _compute(
        self,
        order: tuple[int, ...],
        groups: list[list[int]],
        cancelled: CancelFn,
        *,
        record: bool,
        on_group: Callable[[int, int, bool], None] | None = None,
    ) -> tuple[int, bool]:
        """Per-token NLL of `order` for the batches in `groups`, group after group (stored per batch).

        Returns the restart position and whether it came from the cache; `on_group(g, start,
        reused)` is called as each group is done. A plan's states are recorded only when every
        batch is computed here, each position once all batches have reached it.
        """
        start, x = self._cache.restart(order)
        reused = x is not None
        if x is None:  # nothing cached fits the budget: embed again
            x = [c.hidden for c in self._embed()]
        n_batches = len(self._kwargs)
        record = record and sum(map(len, groups)) == n_batches
        trail = self._cache.trail_for(order) if record else None
        pending: dict[int, dict[int, torch.Tensor]] = {}  # position -> batch -> its input, until all batches have it
        try:
            for g, group in enumerate(groups):
                h = {b: x[b] for b in group}  # batch -> (B, T, H)
                for pos in range(start, len(order)):
                    self._check(cancelled)
                    layer = self._layers[order[pos]]
                    h = {b: layer_hidden(layer(v, use_cache=False, **self._kwargs[b])) for b, v in h.items()}
                    if self._cache.wants(trail, pos + 1):  # h: the input of position pos + 1
                        got = pending.setdefault(pos + 1, {})
                        got.update(h)
                        if len(got) == n_batches:
                            self._cache.offer(trail, pos + 1, [got[b] for b in range(n_batches)])
                            del pending[pos + 1]
                results = {}
                for b, v in h.items():
                    self._check(cancelled)
                    results[b] = self._head(v, b)
                self._store(order, results)
                if on_group is not None:
                    on_group(g, start, reused)
        finally:
            self._cache.release(trail)
        return start, reused

    def _head(self, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-token next-token NLL (B, T-1) of one batch from the last layer's output (B, T, H)."""
        row = sum(self._batch_rows[:batch])
        labels = self.ids[row : row + hidden.shape[0], 1:].to(hidden.device)  # (B, T-1)
        x = self.model.model.norm(hidden[:, :-1])  # (B, T-1, H): the last position predicts nothing
        return head_token_nll(self.model, x.reshape(-1, x.shape[-1]), labels.reshape(-1)).view(labels.shape)

    def _store(self, order: tuple[int, ...], results: dict[int, torch.Tensor]) -> None:
        with self._memo_lock:
            self._parts.setdefault(order, {}).update(results)
            self._parts.move_to_end(order)
            while len(self._parts) > PART_MEMO_SIZE:
                self._parts.popitem(last=False)

    def _parts_of(self, order: tuple[int, ...]) -> dict[int, torch.Tensor]:
        with self._memo_lock:
            return dict(self._parts.get(order, {}))

    @staticmethod
    def _sum(results: dict[int, torch.Tensor]) -> float:
        return float(torch.cat([results[b].reshape(-1) for b in sorted(results)]).double().sum())

    def _make(
        self, plan: LayerPlan, results: dict[int, torch.Tensor], seconds: float, start: int, reused: bool
    ) -> Estimate:
        """The estimate from the batches computed so far: exact when all are there, else partial."""
        tokens = sum(t.numel() for t in results.values())
        rows = sum(self._batch_rows[b] for b in results)
        if tokens >= self.tokens:
            ppl, se = math.exp(self._sum(results) / self.tokens), None
        else:
            batches = sorted(results)
            ppl, se = partial_ppl(
                torch.cat([results[b].reshape(-1) for b in batches]),
                torch.cat([self._base_parts[b].reshape(-1) for b in batches]),
                self._baseline_nll[0],
                self.tokens,
            )
        return Estimate(
            ppl,
            ppl - self.baseline_ppl,
            seconds,
            start,
            plan.to_text(),
            reused,
            self.protocol,
            len(plan) - start,
            tokens,
            self.tokens,
            rows,
            self.ids.shape[0],
            se,
        )

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
    def _memo_answer(self, plan: LayerPlan, t0: float) -> Estimate | None:
        hit = self.known(plan)
        return (
            None
            if hit is None
            else replace(hit, seconds=time.perf_counter() - t0, restarted_at=len(plan), layers_run=0)
        )

    def estimate(
        self,
        plan: LayerPlan,
        cancelled: CancelFn = None,
        *,
        record: bool = True,
        use_memo: bool = True,
        on_partial: Callable[[Estimate], None] | None = None,
    ) -> Estimate:
        """Perplexity of `plan` on the slice and its delta to the unmodified model.

        Raises `evals.perplexity.Cancelled` when `cancelled()` turns true (checked before every
        layer). `record=False` keeps this plan's states out of the cache (the scan uses it so it
        does not push out the user's recent plans); `use_memo=False` recomputes a known plan.
        With `on_partial`, the first part of the slice is computed first and its estimate (not
        `final`, with `coverage` and `stderr`) handed to `on_partial` before the rest refines it;
        the returned estimate is always the exact one.
        """
        self._check_plan(plan)
        t0 = time.perf_counter()
        if use_memo and (hit := self._memo_answer(plan, t0)) is not None:
            return hit
        return retry_on_oom(self, lambda: self._estimate(plan, cancelled, record, use_memo, on_partial))

    def _estimate(self, plan, cancelled, record, use_memo, on_partial) -> Estimate:
        with self._lock:
            self.prepare(cancelled)
            with borrowed(self.model, cancelled):
                t1 = time.perf_counter()  # a first estimate also pays for prepare(); report only its own work
                done = self._parts_of(plan.order) if use_memo else {}
                groups = self._groups if on_partial is not None else [sum(self._groups, [])]
                todo = [g for g in ([b for b in group if b not in done] for group in groups) if g]
                if on_partial is not None and done and len(done) < len(self._kwargs):
                    on_partial(self._make(plan, done, time.perf_counter() - t1, len(plan), True))

                def partial(g: int, start: int, reused: bool) -> None:
                    if on_partial is not None and g < len(todo) - 1:
                        on_partial(
                            self._make(plan, self._parts_of(plan.order), time.perf_counter() - t1, start, reused)
                        )

                start, reused = (
                    self._compute(plan.order, todo, cancelled, record=record, on_group=partial)
                    if todo
                    else (len(plan), True)
                )
            est = self._make(plan, self._parts_of(plan.order), time.perf_counter() - t1, start, reused)
            self._remember(plan.order, est)
            return est

    def estimate_first(self, plan: LayerPlan, cancelled: CancelFn = None) -> Estimate:
        """The first answer alone: the plan on the slice's first part (exact when the slice has one part).

        Records no states (the scan's coarse pass uses it); the part's results stay memoized, so a
        later `estimate` of the plan computes only the rest of the slice.
        """
        self._check_plan(plan)
        t0 = time.perf_counter()
        if (hit := self._memo_answer(plan, t0)) is not None:
            return hit
        return retry_on_oom(self, lambda: self._estimate_first(plan, cancelled))

    def _estimate_first(self, plan: LayerPlan, cancelled: CancelFn) -> Estimate:
        with self._lock:
            self.prepare(cancelled)
            with borrowed(self.model, cancelled):
                t1 = time.perf_counter()
                first = [b for b in self._groups[0] if b not in self._parts_of(plan.order)]
                start, reused = (
                    self._compute(plan.order, [first], cancelled, record=False) if first else (len(plan), True)
                )
            est = self._make(plan, self._parts_of(plan.order), time.perf_counter() - t1, start, reused)
            if est.final:
                self._remember(plan.order, est)
            return est

    def scan(
        self, cancelled: CancelFn = None, layers: Iterable[int] | None = None, *, coarse_first: bool = False
    ) -> Iterator[tuple[int, Estimate]]:
        """Leave-one-out estimate for each layer, yielded as it is computed.

        Default order is last layer first: leaving out layer i restarts at i, so late layers are
        cheapest and the first results arrive at once. Results are memoized, so a scan that was
        cancelled (or interrupted by a toggle) resumes instantly where it stopped. With
        `coarse_first`, every layer first gets its estimate from the slice's first part (not
        `final`), then every layer its exact one (which only computes the rest of the slice).
        """
        retry_on_oom(self, lambda: self.prepare(cancelled))
        n = len(self._layers)
        if n < 2:
            return
        order = list(reversed(range(n))) if layers is None else list(layers)
        if coarse_first and len(self._groups) > 1:
            for i in order:
                yield i, self.estimate_first(LayerPlan.without(n, [i]), cancelled)
        for i in order:
            yield i, self.estimate(LayerPlan.without(n, [i]), cancelled, record=False)
