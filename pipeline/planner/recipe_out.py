"""A plan as a recipe the user can run, edit, or load into the lab's form; and the plan's files.

A plan gives each decoder layer of the source model one option ("skip", "<pattern>/<bits>"). The
recipe applies it with three stages, each left out when it would change nothing:

1. depth, `layers = [...]`: the skipped layers, numbered as in the source model (the protected
   counts are lowered to 0 when a plan skips a protected layer, `--allow-protected`);
2. width, `patterns = { "0-3" = "none", "4-13" = "1:8" }`: each kept layer's N:M pattern;
3. gptq, `layer_bits = { "0-3" = 8, "4-25" = 4, "26-29" = 16 }` (16 = left unquantized) and the
   plan's `group_size`.

Width and gptq maps are keyed by the layer numbers of the model the stage receives, i.e. after the
depth stage: kept layer j is the j-th source layer that is not skipped. `plan_layers` undoes that
translation (tests check the round trip through `pipeline.recipe`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from frankenlab.evals.layer_map import IntLayerMap, TextLayerMap
from frankenlab.pipeline.atomic import atomic_write_text
from frankenlab.pipeline.planner.options import SKIP, parse_option
from frankenlab.pipeline.planner.search import PROTECTED_FIRST, PROTECTED_LAST, is_protected

RECIPE_FILE = "recipe.toml"
PLAN_FILE = "plan.json"
EVAL_PROTOCOL = "wikitext2-concat-512"


def plan_stages(choices: Sequence[str], *, group_size: int = 128) -> list[dict]:
    """The depth / width / gptq stage tables that apply `choices` (one option per source layer)."""
    n = len(choices)
    skipped = [i for i, c in enumerate(choices) if c == SKIP]
    kept = [parse_option(c) for c in choices if c != SKIP]
    stages: list[dict] = []
    if skipped:
        depth: dict = {"kind": "depth", "k": len(skipped), "layers": skipped}
        if any(is_protected(i, n, PROTECTED_FIRST, 0) for i in skipped):
            depth["protected_first"] = 0
        if any(is_protected(i, n, 0, PROTECTED_LAST) for i in skipped):
            depth["protected_last"] = 0
        stages.append(depth)
    if any(o.pattern != "none" for o in kept):
        patterns = TextLayerMap.from_layers({j: o.pattern for j, o in enumerate(kept)}, "patterns")
        stages.append({"kind": "width", "patterns": patterns.to_dict()})
    quant_bits = [o.bits for o in kept if o.bits != 16]
    if quant_bits:
        bits = IntLayerMap.from_layers({j: o.bits for j, o in enumerate(kept)}, "layer_bits")
        common = Counter(quant_bits).most_common(1)[0][0]
        stages.append({"kind": "gptq", "bits": common, "group_size": group_size, "layer_bits": bits.to_dict()})
    return stages


def plan_recipe(
    choices: Sequence[str],
    *,
    model: str = "default",
    group_size: int = 128,
    name: str = "plan",
    description: str = "",
    eval_windows: int = 32,
    model_extra: dict | None = None,
    samples: bool = True,
) -> dict:
    """A whole recipe (plain data, `pipeline.recipe.Recipe.from_dict` reads it) for `choices`."""
    return {
        "name": name,
        "description": description,
        "model": {"source": model, **(model_extra or {})},
        "evaluation": {"perplexity": [EVAL_PROTOCOL], "ppl_limit": eval_windows, "samples": samples},
        "stages": plan_stages(choices, group_size=group_size),
    }


def plan_layers(stages: Sequence[dict], n_layers: int) -> list[str]:
    """The option of every source layer that `stages` (as plan_stages writes them) apply: the inverse."""
    skipped: set[int] = set()
    patterns: dict = {}
    bits: dict = {}
    for s in stages:
        if s["kind"] == "depth":
            if s.get("plan"):  # the recipe form writes the kept layers as a plan ("0-4,6-7")
                from frankenlab.pipeline.plans import LayerPlan

                skipped = set(range(n_layers)) - set(LayerPlan.parse(s["plan"], n_layers).order)
            else:
                skipped = set(s.get("layers") or [])
        elif s["kind"] == "width":
            patterns = s["patterns"]
        elif s["kind"] == "gptq":
            bits = s["layer_bits"]
    pmap = TextLayerMap.parse(patterns, "patterns") if patterns else None
    bmap = IntLayerMap.parse(bits, "layer_bits") if bits else None
    out, j = [], 0
    for i in range(n_layers):
        if i in skipped:
            out.append(SKIP)
            continue
        pattern = pmap.for_layer(j, "none") if pmap else "none"
        out.append(f"{pattern}/{bmap.for_layer(j, 16) if bmap else 16}")
        j += 1
    return out


def write_plan(out: str | Path, recipe_text: str, plan: dict) -> tuple[Path, Path]:
    """DIR/recipe.toml and DIR/plan.json, each written atomically (names fixed here, never from content)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path, plan_path = folder / RECIPE_FILE, folder / PLAN_FILE
    atomic_write_text(recipe_path, recipe_text)
    atomic_write_text(plan_path, json.dumps(plan, indent=2, default=str) + "\n")
    return recipe_path, plan_path
