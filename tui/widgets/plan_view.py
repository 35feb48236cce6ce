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
    windows: object = None  # None: the sensitivity pass's default calibration windows
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
    """Sensitivities (cache, else measured on a copy), then the search. Raises Cancelled, RecipeError.

    On a cancel the entries measured so far are in the cache; `Cancelled.table` (set here) holds them."""
    from frankenlab.evals.cancel import Cancelled
    from frankenlab.pipeline.planner.sensitivity import measure_sensitivities, model_digest
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
    table, copy, before = None, None, 0
    with borrowed(lm.model, cancelled):  # chat swaps the layer list while it answers: read the model whole
        digest = _DIGESTS.get(lm.model)
        if digest is None:
            digest = _DIGESTS[lm.model] = model_digest(lm.model)
        if previous is not None and _same_key(previous, digest, ch, req.windows) and previous.complete:
            table, before = previous, sum(map(len, previous.deltas.values()))
        else:
            table = measure_sensitivities(lm.model, lm.tokenizer, digest=digest, layers=[], **kw)  # the cache only
            before = sum(map(len, table.deltas.values()))
            if not table.complete:
                copy = run_copy(lm.model)  # the pass edits one layer at a time: never the lab's own model
    if copy is not None:
        try:
            table = measure_sensitivities(copy, lm.tokenizer, digest=digest, progress=progress, cancel=cancelled, **kw)
        except Cancelled as exc:
            exc.table = measure_sensitivities(copy, lm.tokenizer, digest=digest, layers=[], **kw)
            raise
        finally:
            del copy
    result = PlanResult(req, table, measured=sum(map(len, table.deltas.values())) - before)
    result.front, result.fixed = search(table, req.facts, ch.group_size)
    result.chosen = result.front.best_within(req.budget.bytes)
    return result


def _same_key(table, digest: str, ch: Choices, windows) -> bool:
    from frankenlab.pipeline.planner.sensitivity import windows_description

    return (
        table.model_digest == digest
        and tuple(table.patterns) == ch.patterns
        and tuple(table.bits) == ch.bits
        and table.group_size == ch.group_size
        and table.windows == windows_description(windows)
    )


def search(table, facts, group_size: int):
    """(the predicted front, the fixed bytes): every layer's options priced, the knapsack solved exactly."""
    from frankenlab.pipeline.planner.budget import embed_bytes
    from frankenlab.pipeline.planner.search import solve_table

    fixed = embed_bytes(facts, "bf16", group_size)
    return solve_table(table, facts, group_size, fixed), fixed


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
