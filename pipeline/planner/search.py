"""The search: one option per decoder layer, least predicted loss under a byte budget.

The predicted loss of a plan is additive: `baseline_nll + sum over layers of delta(layer, option)`,
each delta measured with only that layer changed (pipeline/planner/sensitivity.py), and its predicted
perplexity is `exp` of that. Choosing one option per layer under a byte budget is a multiple-choice
knapsack; it is solved exactly by dynamic programming with Pareto merging: layer by layer, every kept
partial plan is extended by every option of the next layer, and only the non-dominated (bytes, loss)
pairs survive (no other partial plan is both no larger and no worse), each with a back-pointer to its
parent and option. After the last layer the survivors are the whole predicted front: for every budget,
the best plan is the largest front point that fits, and for a quality bound (`--max-ppl`), the smallest
point within it.

Decoder layers of one model mostly share their shapes, so byte totals collide and the Pareto sets stay
small (a few thousand points for 30 layers x 17 options). Should a set still exceed `max_states`, the
search starts again with every option's bytes rounded up to a multiple of a bucket size (reported as
`Front.bucket`): exact for the rounded problem, and a plan that fits with rounded bytes fits for real.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from frankenlab.evals.config import require
from frankenlab.pipeline.planner.options import SKIP, option_name, parse_option

PROTECTED_FIRST = 4  # as the depth stage's defaults: never skipped unless --allow-protected
PROTECTED_LAST = 2
MAX_STATES = 200_000


@dataclass(frozen=True)
class LayerOptions:
    """One decoder layer's choices: its number in the source model, and per option its bytes and delta."""

    layer: int
    options: tuple[str, ...]
    bytes: tuple[int, ...]
    deltas: tuple[float, ...]

    def __post_init__(self):
        require(
            len(self.options) == len(self.bytes) == len(self.deltas) and self.options,
            f"layer {self.layer}: every option needs its bytes and its delta, and a layer needs at least one option",
        )


@dataclass(frozen=True)
class FrontPoint:
    bytes: int  # weight bytes of the whole model: decoder layers + the fixed part (embeddings, head, norm)
    delta: float  # predicted change in log-perplexity (sum of the chosen options' deltas)
    ppl: float  # predicted perplexity, exp(baseline_nll + delta)
    choices: tuple[str, ...]  # the option of each layer, in the order of `Front.layers`

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "delta": self.delta, "ppl": self.ppl, "choices": list(self.choices)}


@dataclass
class Front:
    """The predicted Pareto front, smallest first (bytes strictly up, predicted loss strictly down)."""

    points: list[FrontPoint]
    layers: tuple[int, ...]  # source layer numbers, the order of every point's `choices`
    baseline_nll: float
    fixed_bytes: int = 0
    bucket: int | None = None  # bytes were rounded up to multiples of this (None: exact)
    notes: list[str] = field(default_factory=list)
    offset: float = 0.0  # every point's delta includes this (the reference's, for a table measured around one)

    @property
    def smallest(self) -> FrontPoint:
        return self.points[0]

    def best_within(self, budget: int) -> FrontPoint | None:
        """The least predicted loss among plans of at most `budget` bytes (None: nothing fits)."""
        fits = [p for p in self.points if p.bytes <= budget]
        return fits[-1] if fits else None

    def smallest_within(self, max_ppl: float) -> FrontPoint | None:
        """The smallest plan whose predicted perplexity is at most `max_ppl` (None: none is)."""
        return next((p for p in self.points if p.ppl <= max_ppl), None)

    def nearest(self, budget: int, k: int, always: FrontPoint | None = None) -> list[FrontPoint]:
        """The `k` front points whose bytes are nearest `budget` (either side), `always` among them, by bytes."""
        ranked = sorted(self.points, key=lambda p: (abs(p.bytes - budget), p.bytes))
        picked = ranked[:k]
        if always is not None and always not in picked and k > 0:
            picked = [*picked[: k - 1], always]
        return sorted(picked, key=lambda p: p.bytes)

    def spread(self, budget: int, k: int, within: float, always: FrontPoint | None = None) -> list[FrontPoint]:
        """Up to `k` front points with bytes in budget x (1 +- `within`), spaced evenly in bytes (for each
        of k evenly spaced byte targets the nearest point not yet taken), `always` among them, by bytes.
        Plans that differ only by noise-sized choices (the k nearest) cannot show whether the predicted
        ranking holds; plans spread over the band can."""
        lo, hi = budget * (1 - within), budget * (1 + within)
        band = [p for p in self.points if lo <= p.bytes <= hi]
        picked: list[FrontPoint] = []
        if always is not None and always in band and k > 0:
            picked.append(always)
        targets = [lo + (hi - lo) * j / max(1, k - 1) for j in range(k)] if k > 1 else [budget]
        for t in sorted(targets, key=lambda t: abs(t - (always.bytes if always else budget))):
            if len(picked) >= k:
                break
            free = [p for p in band if p not in picked]
            if not free:
                break
            if picked and min(abs(t - q.bytes) for q in picked) <= (hi - lo) / max(1, 2 * (k - 1)):
                continue  # a target already covered (by the always-kept point)
            picked.append(min(free, key=lambda p: (abs(p.bytes - t), p.bytes)))
        for p in sorted(band, key=lambda p: abs(p.bytes - budget)):  # fewer targets met than k: fill, nearest first
            if len(picked) >= k:
                break
            if p not in picked:
                picked.append(p)
        return sorted(picked, key=lambda p: p.bytes)

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "baseline_nll": self.baseline_nll,
            "fixed_bytes": self.fixed_bytes,
            "bucket": self.bucket,
            "offset": self.offset,
            "notes": list(self.notes),
            "points": [p.to_dict() for p in self.points],
        }


def _merge(states_b, states_l, opt_b, opt_l):
    """Extend every state by every option; keep the non-dominated ones. Returns (b, l, parent, option)."""
    k = len(opt_b)
    cand_b = (states_b[:, None] + opt_b[None, :]).reshape(-1)
    cand_l = (states_l[:, None] + opt_l[None, :]).reshape(-1)
    order = np.lexsort((cand_l, cand_b))  # bytes up, then loss up; stable: ties keep the first
    sl = cand_l[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(sl)[:-1]))
    keep = order[sl < best_before]  # strictly better than everything no larger
    return cand_b[keep], cand_l[keep], keep // k, keep % k


def solve(
    layers: Sequence[LayerOptions],
    *,
    baseline_nll: float = 0.0,
    fixed_bytes: int = 0,
    max_states: int = MAX_STATES,
    bucket: int | None = None,
    offset: float = 0.0,
) -> Front:
    """The exact predicted front of the multiple-choice knapsack over `layers` (see the module docstring).
    `offset` is added to every plan's delta (the reference's change, when the deltas are measured
    around one: `SensitivityTable.offset`)."""
    require(len(layers) > 0, "the planner needs at least one decoder layer")
    while True:
        front = _solve(layers, baseline_nll, fixed_bytes, max_states, bucket, offset)
        if front is not None:
            return front
        top = sum(max(lo.bytes) for lo in layers)
        bucket = max(1, math.ceil(top / max_states) * 2 if bucket is None else bucket * 2)


def _solve(layers, baseline_nll, fixed_bytes, max_states, bucket, offset) -> Front | None:
    states_b = np.zeros(1, dtype=np.int64)
    states_l = np.zeros(1, dtype=np.float64)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for lo in layers:
        ob = np.asarray(lo.bytes, dtype=np.int64)
        if bucket:
            ob = -(-ob // bucket) * bucket  # rounded up: a rounded plan that fits fits for real
        states_b, states_l, parent, opt = _merge(states_b, states_l, ob, np.asarray(lo.deltas, dtype=np.float64))
        if len(states_b) > max_states:
            return None
        trail.append((parent, opt))
    points = []
    for s in range(len(states_b)):
        idx, picks = s, []
        for parent, opt in reversed(trail):
            picks.append(int(opt[idx]))
            idx = int(parent[idx])
        picks.reverse()
        choices = tuple(lo.options[j] for lo, j in zip(layers, picks, strict=True))
        true_bytes = fixed_bytes + sum(lo.bytes[j] for lo, j in zip(layers, picks, strict=True))
        delta = math.fsum([offset, *(lo.deltas[j] for lo, j in zip(layers, picks, strict=True))])
        points.append(FrontPoint(int(true_bytes), delta, _ppl(baseline_nll, delta), choices))
    notes = []
    if bucket:
        from frankenlab.pipeline.units import fmt_bytes

        notes.append(
            f"bytes bucketed: every option's bytes rounded up to a multiple of {fmt_bytes(bucket)} "
            f"({bucket} bytes) to keep the Pareto sets under {max_states} points"
        )
        points = _pareto(points)
    return Front(points, tuple(lo.layer for lo in layers), baseline_nll, fixed_bytes, bucket, notes, offset)


def _pareto(points: list[FrontPoint]) -> list[FrontPoint]:
    out: list[FrontPoint] = []
    for p in sorted(points, key=lambda p: (p.bytes, p.delta)):
        if not out or p.delta < out[-1].delta:
            out.append(p)
    return out


def _ppl(baseline_nll: float, delta: float) -> float:
    x = baseline_nll + delta
    return math.exp(x) if x < 700 else math.inf


# -- from a sensitivity table -----------------------------------------------------------------------
def is_protected(layer: int, n_layers: int, first: int = PROTECTED_FIRST, last: int = PROTECTED_LAST) -> bool:
    return layer < first or layer >= n_layers - last


def layer_options(
    table,
    bytes_of: Callable[[str], int],
    *,
    options: Sequence[str] | None = None,
    allow_protected: bool = False,
    scale: Callable[[str], float] | None = None,
    shift: Callable[[str], float] | None = None,
) -> list[LayerOptions]:
    """Per source layer, the options of `table` (a SensitivityTable: `.layers`, `.options`, `.delta`)
    with their bytes (`bytes_of(option)`: one decoder layer's stored bytes) and deltas; "skip" is
    left out for the first 4 and last 2 layers unless `allow_protected`. `shift(option)` is added to a
    delta (the interaction correction of `pipeline.planner.reference.corrections`), and `scale(option)`
    multiplies the sum (the calibration of a validated front)."""
    names = list(options if options is not None else table.options)
    names = [o for o in names if not _no_saving(o, names, bytes_of)]
    layers = range(table.layers) if isinstance(table.layers, int) else table.layers
    n = len(layers)
    out = []
    for pos, layer in enumerate(layers):
        allowed = [o for o in names if o != SKIP or allow_protected or not is_protected(pos, n)]
        deltas = tuple(
            (float(table.delta(layer, o)) + (shift(o) if shift else 0.0)) * (scale(o) if scale else 1.0)
            for o in allowed
        )
        out.append(LayerOptions(int(layer), tuple(allowed), tuple(bytes_of(o) for o in allowed), deltas))
    return out


def _no_saving(option: str, names: Sequence[str], bytes_of: Callable[[str], int]) -> bool:
    """An N:M option that stores no fewer bytes than the dense option of its bits (3-bit codes over a
    pattern are stored dense): pruning that saves nothing can only lose quality, so a lower measured
    delta for it is measurement noise and the search never offers it."""
    if option == SKIP:
        return False
    opt = parse_option(option)
    if opt.pattern == "none":
        return False
    dense = option_name("none", opt.bits)
    return dense in names and bytes_of(dense) <= bytes_of(option)


def solve_table(
    table, facts, group_size: int, fixed_bytes: int, *, allow_protected: bool = False, scale=None, shift=None
) -> Front:
    """The predicted front of a sensitivity table: every option priced for the model (`facts`, a
    `pipeline.planner.budget.ModelFacts`) at `group_size`, the knapsack solved exactly."""
    from frankenlab.pipeline.planner.budget import layer_bytes

    sizes = {o: layer_bytes(facts, o, group_size) for o in table.options}
    layers = layer_options(table, sizes.__getitem__, allow_protected=allow_protected, scale=scale, shift=shift)
    offset = float(getattr(table, "offset", 0.0))
    return solve(layers, baseline_nll=table.baseline_nll, fixed_bytes=fixed_bytes, offset=offset)
