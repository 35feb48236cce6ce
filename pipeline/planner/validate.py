"""Proof by measurement: compare predicted and measured perplexity of front points, calibrate.

`sessions/plan_validation.py`'s `run_validation` runs front points as one sweep (a layer above this
one: it runs jobs) and hands back a `Measured` per point. Every configuration's session holds the
baseline evaluation (stage 0) and the final one; the predicted perplexity on the evaluation data is
the measured baseline perplexity times `exp(predicted delta)`, so only the deltas are predicted, not
the level of a different text.

`calibrate` refits the additive model with the measured interactions: the measured change in
log-perplexity of each plan is fitted, by least squares, as a weighted sum of its predicted deltas
grouped by kind (skipped layers, N:M-pruned layers, layers only quantized), one multiplier per kind
(a single common multiplier when there are too few plans or the kinds cannot be told apart). The
multipliers scale the sensitivity table's deltas for a new search (`search.layer_options(scale=...)`).
Nothing here loads a model or runs anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from frankenlab.pipeline.planner.options import SKIP, parse_option
from frankenlab.pipeline.planner.search import FrontPoint

KINDS = ("skip", "sparse", "quant")
OFF_THRESHOLD = 0.05  # RMS error of predicted log-perplexity beyond which the front is re-ranked
VALIDATION_DIR = "validation"


def kind_of(option: str) -> str | None:
    """'skip', 'sparse' (an N:M pattern, any bits), 'quant' (dense, quantized) or None (unchanged)."""
    if option == SKIP:
        return "skip"
    opt = parse_option(option)
    if opt.nm is not None:
        return "sparse"
    return "quant" if opt.quantized else None


@dataclass
class Measured:
    point: FrontPoint
    label: str
    status: str  # the configuration's session status
    measured_ppl: float | None = None
    baseline_ppl: float | None = None
    measured_bytes: int | None = None  # the final model's weights with dense floats as bf16 (the plan's convention)
    session: str = ""

    @property
    def ok(self) -> bool:
        return self.measured_ppl is not None and self.baseline_ppl is not None

    @property
    def predicted_ppl(self) -> float | None:
        """The evaluation perplexity the additive model predicts: measured baseline x exp(delta)."""
        return None if self.baseline_ppl is None else self.baseline_ppl * math.exp(self.point.delta)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "status": self.status,
            "bytes": self.point.bytes,
            "measured_bytes": self.measured_bytes,
            "predicted_delta": self.point.delta,
            "predicted_ppl": self.predicted_ppl,
            "measured_ppl": self.measured_ppl,
            "baseline_ppl": self.baseline_ppl,
            "choices": list(self.point.choices),
            "session": self.session,
        }


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on mean ranks); nan with fewer than 2 points or no spread."""
    if len(xs) != len(ys) or len(xs) < 2:
        return math.nan
    rx, ry = np.asarray(_ranks(xs)), np.asarray(_ranks(ys))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den else math.nan


@dataclass
class Calibration:
    multipliers: dict[str, float]  # per kind ("skip", "sparse", "quant")
    rms_before: float  # RMS error of predicted log-perplexity (nats) before the fit
    rms_after: float
    plans: int
    common: bool  # one multiplier for every kind
    notes: list[str] = field(default_factory=list)

    @property
    def off(self) -> bool:
        return self.rms_before > OFF_THRESHOLD

    def scale(self, option: str) -> float:
        kind = kind_of(option)
        return 1.0 if kind is None else self.multipliers.get(kind, 1.0)

    @property
    def text(self) -> str:
        mult = ", ".join(f"{k} x{v:.3g}" for k, v in self.multipliers.items())
        return (
            f"calibration over {self.plans} plan(s): deltas {mult}"
            f"{' (one multiplier for every kind)' if self.common else ''}; RMS error of predicted log-ppl "
            f"{self.rms_before:.4f} -> {self.rms_after:.4f}"
        )

    def to_dict(self) -> dict:
        return {
            "multipliers": self.multipliers,
            "rms_before": self.rms_before,
            "rms_after": self.rms_after,
            "plans": self.plans,
            "common": self.common,
            "off": self.off,
            "threshold": OFF_THRESHOLD,
            "notes": list(self.notes),
        }


def kind_sums(point: FrontPoint, delta_of: Callable[[int, str], float]) -> dict[str, float]:
    """The plan's predicted delta split by kind: `delta_of(position, option)` gives one layer's delta."""
    out = dict.fromkeys(KINDS, 0.0)
    for pos, option in enumerate(point.choices):
        kind = kind_of(option)
        if kind is not None:
            out[kind] += delta_of(pos, option)
    return out


def calibrate(
    measured: Sequence[Measured], delta_of: Callable[[int, str], float], offset: float = 0.0
) -> Calibration | None:
    """Fit measured delta log-ppl ~ `offset` + sum over kinds of multiplier x predicted delta (None:
    nothing measured). `offset` is the reference's change for deltas measured around one (it is
    measured, not predicted, so it is not scaled)."""
    rows = [m for m in measured if m.ok and m.measured_ppl > 0 and m.baseline_ppl > 0]
    if not rows:
        return None
    y = np.array([math.log(m.measured_ppl / m.baseline_ppl) - offset for m in rows])
    sums = [kind_sums(m.point, delta_of) for m in rows]
    X = np.array([[s[k] for k in KINDS] for s in sums])
    pred = X.sum(1)
    rms_before = float(np.sqrt(np.mean((pred - y) ** 2)))
    active = [i for i, k in enumerate(KINDS) if np.any(np.abs(X[:, i]) > 1e-12)]
    notes: list[str] = []
    coef = None
    if len(rows) >= len(active) + 1 and active:
        sol, _res, rank, _sv = np.linalg.lstsq(X[:, active], y, rcond=None)
        if rank == len(active) and np.all(sol > 0):
            coef = dict.fromkeys(KINDS, 1.0)
            for i, c in zip(active, sol, strict=True):
                coef[KINDS[i]] = float(c)
        else:
            notes.append("per-kind fit not usable (kinds not told apart, or a negative multiplier): one multiplier")
    elif active:
        notes.append(f"{len(rows)} plan(s) cannot fit {len(active)} kind multipliers: one multiplier for all")
    common = coef is None
    if common:
        den = float(pred @ pred)
        c = float(pred @ y) / den if den > 0 else 1.0
        c = c if c > 0 else 1.0
        coef = dict.fromkeys(KINDS, c)
    fitted = X @ np.array([coef[k] for k in KINDS])
    rms_after = float(np.sqrt(np.mean((fitted - y) ** 2)))
    return Calibration(coef, rms_before, rms_after, len(rows), common, notes)
