"""The Plan pane's work, free of Textual: inputs parsed, the plan computed.

`compute_plan` runs in the pane's thread worker: it reads the sensitivity table from the cache (or
measures what is missing, on a copy of the lab's model so chat and what-if keep theirs), then solves
the knapsack (`pipeline.planner.search`) and picks the best plan within the budget. The drawings
(verdict, per-layer map, front plot) are `tui/plan_render.py`, shared with `frankenlab plan`.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.planner.options import DEFAULT_BITS, DEFAULT_PATTERNS, OptionError, parse_choice_words
from frankenlab.pipeline.units import fmt_bytes

DEFAULT_GROUP = 128
CHOICES_HELP = "write patterns=none,1:8,2:4 bits=16,8,4 group=128 (any of the three, space-separated)"
DEFAULT_CHOICES = f"patterns={','.join(DEFAULT_PATTERNS)} bits={','.join(map(str, DEFAULT_BITS))} group={DEFAULT_GROUP}"


@dataclass(frozen=True)
class Choices:
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    bits: tuple[int, ...] = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP


def parse_choices(text: str) -> Choices:
    """ "patterns=none,2:4 bits=16,4 group=32" (each part optional; empty = the planner's defaults)."""
    try:
        pats, bs, group = parse_choice_words(str(text or "").split(), CHOICES_HELP, group=DEFAULT_GROUP)
    except OptionError as exc:
        raise RecipeError(str(exc)) from None
    return Choices(pats, bs, group)


def parse_budget_text(text: str, facts):
    """The pane's one budget field: a size (60MiB), a share (45%) or a target name (siracusa)."""
    from frankenlab.pipeline.planner.budget import parse_budget

    text = str(text or "").strip()
    if not text:
        from frankenlab.pipeline.targets import load_targets

        names = ", ".join(load_targets())
        raise RecipeError(f"type a budget first: 60MiB, 45% (of the dense bf16 weights) or a target ({names})")
    is_size = bool(re.match(r"[0-9.]", text)) or text.endswith("%")
    return parse_budget(text if is_size else None, None if is_size else text, facts)


# -- the work (a thread worker) ------------------------------------------------------------------
@dataclass
class PlanRequest:
    lm: object  # the lab's LoadedModel
    facts: object  # ModelFacts of the source model
    budget: object  # pipeline.planner.budget.Budget
    choices: Choices
    data_dir: object = None
    cache_dir: object = None
    windows: object = None  # None: the sensitivity pass's default scoring windows
    around: str = "auto"  # the reference (pipeline/planner/reference.py): auto, or an option such as 8:16/4
    seq: int = 0


@dataclass
class PlanResult:
    request: PlanRequest
    table: object  # SensitivityTable
    front: object = None  # search.Front (None when the table is incomplete)
    chosen: object = None  # the FrontPoint within the budget, or None
    fixed: int = 0  # embeddings + head + final norm bytes
    measured: int = 0  # entries measured by this request (0: all from the cache)
    notes: list[str] = field(default_factory=list)


# model -> digest of its weights as loaded (the lab's baseline never changes in place)
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compute_plan(
    req: PlanRequest,
    *,
    cancelled: Callable[[], bool],
    progress: Callable[[float, str], None] | None = None,
    log: Callable[[str], None] | None = None,
    previous=None,
) -> PlanResult:
    """The reference (`req.around`; auto: the best uniform option within the budget), sensitivities
    around it (cache, else measured on a copy), then the search. Raises Cancelled, RecipeError.

    On a cancel the entries measured so far are in the cache; `Cancelled.table` (set here) holds them."""
    from frankenlab.evals.cancel import Cancelled
    from frankenlab.pipeline.planner import reference
    from frankenlab.pipeline.planner.budget import embed_bytes
    from frankenlab.pipeline.planner.options import choice_set
    from frankenlab.pipeline.planner.sensitivity import (
        load_cached,
        measure_sensitivities,
        model_digest,
        reference_option,
    )
    from frankenlab.pipeline.sharing import borrowed
    from frankenlab.tui.lab_state import run_copy

    lm, ch = req.lm, req.choices
    kw = dict(
        patterns=ch.patterns,
        bits=ch.bits,
        group_size=ch.group_size,
        windows=req.windows,
        cache_dir=req.cache_dir,
        data_dir=req.data_dir,
        log=log,
    )
    key = {k: kw[k] for k in ("patterns", "bits", "group_size", "windows", "cache_dir")}
    notes: list[str] = []
    auto = str(req.around).strip().lower() == reference.AUTO
    cands = []
    fixed = embed_bytes(req.facts, "bf16", ch.group_size)
    options = choice_set(ch.patterns, ch.bits)
    uniform_all = reference.uniform_options(req.facts, req.budget.bytes, fixed, options, ch.group_size)

    def uniform_for(ref: str | None) -> list[tuple[str, int]]:  # measured for the interaction corrections
        return [(o, b) for o, b in uniform_all if o != (ref or "none/16")]

    if auto:
        cands = reference.candidates(req.facts, req.budget.bytes, fixed, options, ch.group_size)
        if not reference.needs_reference(cands):
            auto, around = False, None
            if not cands and previous is not None and previous.complete:
                around = previous.around  # nothing fits: the verdict needs a front, the one at hand serves
            notes.append(
                f"reference: {'kept' if around else 'the unmodified model'} ({reference.why_none(cands, True)})"
            )
    else:
        around = reference_option(req.around)
    table, copy, before = None, None, 0
    with borrowed(lm.model, cancelled):  # chat swaps the layer list while it answers: read the model whole
        digest = _DIGESTS.get(lm.model)
        if digest is None:
            digest = _DIGESTS[lm.model] = model_digest(lm.model)
        if auto:
            known = reference.cached(digest, cands, **key)
            around = min(known, key=known.get) if len(known) == len(cands) else None
            resolved = len(known) == len(cands)
        else:
            resolved = True
        if (
            resolved
            and previous is not None
            and _same_key(previous, digest, ch, req.windows, around)
            and previous.complete
        ):
            table, before = previous, sum(map(len, previous.deltas.values()))
        elif resolved:
            table = load_cached(digest, around=around, **key)
            before = 0 if table is None else sum(map(len, table.deltas.values()))
        uniform = reference.cached(digest, uniform_for(around), **key) if table is not None else {}
        if table is None or not table.complete or len(uniform) < len(uniform_for(around)):
            copy = run_copy(lm.model)  # the pass edits one layer at a time: never the lab's own model
    if copy is not None:
        try:
            if auto and not resolved:
                if progress is not None:
                    progress(0.0, f"measuring {len(cands)} uniform reference(s): {', '.join(c for c, _ in cands)}")
                around, _ = reference.pick(copy, lm.tokenizer, cands, digest=digest, cancel=cancelled, **kw)
                table = load_cached(digest, around=around, **key)
                before = 0 if table is None else sum(map(len, table.deltas.values()))
            table = measure_sensitivities(
                copy, lm.tokenizer, digest=digest, around=around, progress=progress, cancel=cancelled, **kw
            )
            opts = uniform_for(around)
            if progress is not None and opts:
                progress(1.0, f"interactions: every layer at {', '.join(o for o, _ in opts)}")
            uniform = reference.measure_uniform(copy, lm.tokenizer, opts, digest=digest, cancel=cancelled, **kw)
        except Cancelled as exc:
            exc.table = None if auto and around is None else load_cached(digest, around=around, **key)
            raise
        finally:
            del copy
    if table.around is not None:
        notes.append(
            f"reference: every layer at {table.around} (ppl {_exp(table.reference_nll)} on the sensitivity windows)"
        )
    shifts = reference.corrections(table, uniform)
    if shifts:
        notes.append("interactions: " + ", ".join(f"{o} {c:+.4f}" for o, c in shifts.items()) + " nats per layer")
    result = PlanResult(req, table, measured=sum(map(len, table.deltas.values())) - before, notes=notes)
    result.front, result.fixed = search(table, req.facts, ch.group_size, shifts)
    result.chosen = result.front.best_within(req.budget.plan_bytes)
    return result


def _exp(nll: float) -> str:
    import math

    return f"{math.exp(nll):.4g}"


def _same_key(table, digest: str, ch: Choices, windows, around=None) -> bool:
    from frankenlab.pipeline.planner.sensitivity import windows_description

    return (
        table.model_digest == digest
        and tuple(table.patterns) == ch.patterns
        and tuple(table.bits) == ch.bits
        and table.group_size == ch.group_size
        and table.windows == windows_description(windows)
        and table.around == around
    )


def search(table, facts, group_size: int, shifts: dict[str, float] | None = None):
    """(the predicted front, the fixed bytes): every layer's options priced (`shifts`: the interaction
    corrections), the knapsack solved exactly."""
    from frankenlab.pipeline.planner.budget import embed_bytes
    from frankenlab.pipeline.planner.search import solve_table

    fixed = embed_bytes(facts, "bf16", group_size)
    shift = (lambda o: shifts.get(o, 0.0)) if shifts else None
    return solve_table(table, facts, group_size, fixed, shift=shift), fixed


def plan_recipe_data(result: PlanResult, model_ref: str) -> dict:
    """The chosen plan as recipe data (`pipeline.planner.recipe_out.plan_recipe`), for the recipe form."""
    from frankenlab.pipeline.planner.recipe_out import plan_recipe

    p, budget = result.chosen, result.request.budget
    return plan_recipe(
        p.choices,
        model=model_ref,
        group_size=result.request.choices.group_size,
        name=f"plan {fmt_bytes(p.bytes)}",
        description=f"the lab's Plan pane: within {budget.label}; {fmt_bytes(p.bytes)} of weights, "
        f"predicted ppl {p.ppl:.4g} on the sensitivity windows",
    )
