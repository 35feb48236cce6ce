"""The operating point a sensitivity pass is measured around ("--around auto").

Deltas measured around the unmodified model add up badly when many layers change at once (on the
bundled model, uniform 3-bit measured 3.5x worse than the sum of its one-layer deltas). Measured
around a reference, every layer at one option close to the budget, each delta is a local one and the
uniform reference itself is one of the plans (all deltas 0), so the search can only predict an
improvement on it. `auto` measures each uniform option that fits the budget (down to
`REFERENCE_BAND` of the largest that fits) as a reference on the scoring windows and takes the one
with the lowest loss: one sequential build per candidate (about 45 s on the bundled model), stored in
that candidate's table file so the next run reads it.

    cands = candidates(facts, budget_bytes, fixed_bytes, options, group_size)  # [(option, bytes)], largest first
    best, nll = pick(model, tokenizer, cands, report=print, **measure_kw)     # the reference, {option: NLL}
"""

from __future__ import annotations

import math
from collections.abc import Callable

from frankenlab.pipeline.planner.options import SKIP, UNCHANGED

REFERENCE_BAND = 0.9  # candidates: uniform options with at least this share of the largest that fits
AUTO = "auto"


def candidates(facts, budget_bytes: int | None, fixed: int, options, group_size: int) -> list[tuple[str, int]]:
    """(option, weight bytes with every layer at it) for the uniform options that fit `budget_bytes`,
    largest first, down to `REFERENCE_BAND` of the largest; [] without a budget or when none fits.
    A reference is an operating point, not a plan: it is measured against the budget's weight bytes
    (`Budget.bytes`), not what a plan may take once the compact file's header is kept free."""
    from frankenlab.pipeline.planner.budget import layer_bytes

    if budget_bytes is None:
        return []
    sized = [(o, fixed + facts.layers * layer_bytes(facts, o, group_size)) for o in options if o != SKIP]
    fits = sorted((c for c in sized if c[1] <= budget_bytes), key=lambda c: -c[1])
    return [c for c in fits if c[1] >= REFERENCE_BAND * fits[0][1]] if fits else []


def needs_reference(cands: list[tuple[str, int]]) -> bool:
    """False when there is nothing to measure around: no uniform option fits, or the unmodified model does."""
    return bool(cands) and cands[0][0] != UNCHANGED


def cached(digest: str, cands: list[tuple[str, int]], **key) -> dict[str, float]:
    """{option: reference NLL} of the candidates whose reference is stored (`key`: load_cached's arguments)."""
    from frankenlab.pipeline.planner.sensitivity import load_cached

    out = {}
    for option, _size in cands:
        table = load_cached(digest, around=option, **key)
        if table is not None and not math.isnan(table.reference_nll):
            out[option] = table.reference_nll
    return out


def pick(
    model,
    tokenizer,
    cands: list[tuple[str, int]],
    *,
    report: Callable[[str, int, float, float], None] | None = None,
    **kw,
) -> tuple[str | None, dict[str, float]]:
    """(the candidate with the lowest reference NLL, {option: NLL}), measuring each reference that is not
    stored (`kw`: measure_sensitivities' arguments); (None, {}) when `needs_reference` says there is none.
    `report(option, bytes, nll, seconds)` after each."""
    if not needs_reference(cands):
        return None, {}
    nll = measure_uniform(model, tokenizer, cands, report=report, **kw)
    return min(nll, key=lambda o: (nll[o], -dict(cands)[o])), nll


def any_cached(digest: str, options, **key) -> str | None:
    """A reference whose table is stored complete for this key (`key`: load_cached's arguments), or None.
    When no uniform option fits the budget, the verdict needs a front, not an operating point near
    the budget: a table at hand serves it in seconds instead of a pass around the unmodified model."""
    from frankenlab.pipeline.planner.sensitivity import load_cached

    for option in options:
        if option == SKIP:
            continue
        table = load_cached(digest, around=option, **key)
        if table is not None and table.complete and not math.isnan(table.reference_nll):
            return option
    return None


def why_none(cands: list[tuple[str, int]], has_budget: bool) -> str:
    """Why the pass runs around the unmodified model (when `needs_reference` is False)."""
    if not has_budget:
        return "no budget"
    return "no uniform option fits" if not cands else "the unmodified model fits"


# -- interaction corrections ------------------------------------------------------------------------
CORRECT_ABOVE = 1.5  # uniform options measured for corrections: up to this multiple of the budget


def uniform_options(facts, budget_bytes: int | None, fixed: int, options, group_size: int) -> list[tuple[str, int]]:
    """(option, uniform bytes) worth a uniform measurement for `corrections`: the reference candidates
    and the options a plan mixes in to spend bytes (uniform bytes up to `CORRECT_ABOVE` x the budget);
    [] without a budget."""
    from frankenlab.pipeline.planner.budget import layer_bytes

    if budget_bytes is None:
        return []
    cands = candidates(facts, budget_bytes, fixed, options, group_size)
    low = min((b for _, b in cands), default=budget_bytes)
    sized = [(o, fixed + facts.layers * layer_bytes(facts, o, group_size)) for o in options if o != SKIP]
    return sorted(
        [(o, b) for o, b in sized if low <= b <= CORRECT_ABOVE * budget_bytes and o != UNCHANGED],
        key=lambda c: c[1],
    )


def corrections(table, uniform_nll: dict[str, float]) -> dict[str, float]:
    """Per option o with a measured uniform NLL U_o (every layer at o): the interaction the one-layer
    deltas miss, spread evenly over the layers, ((U_o - R) - sum over layers of delta(l, o)) / layers,
    R the table's reference NLL (the unmodified model's without `around`). Added to every layer's
    delta of o (`search.layer_options(shift=...)`), the additive model is exact at both ends: the
    reference, and every layer at o; a plan with k layers at o is charged k shares. Options the
    table has not measured in full are left out."""
    ref = table.baseline_nll if table.around is None else table.reference_nll
    out = {}
    for option, nll in uniform_nll.items():
        if option == SKIP or option == table.zero_option or option not in table.options:
            continue
        try:
            total = math.fsum(table.delta(li, option) for li in range(table.layers))
        except KeyError:
            continue
        out[option] = ((nll - ref) - total) / table.layers
    return out


def measure_uniform(model, tokenizer, opts: list[tuple[str, int]], *, report=None, **kw) -> dict[str, float]:
    """{option: uniform NLL} for `opts`, from the cache or measured (as `pick` does for references)."""
    import time

    from frankenlab.pipeline.planner.sensitivity import measure_sensitivities

    out = {}
    for option, size in opts:
        t = time.perf_counter()
        out[option] = measure_sensitivities(model, tokenizer, around=option, layers=[], **kw).reference_nll
        if report is not None:
            report(option, size, out[option], time.perf_counter() - t)
    return out
