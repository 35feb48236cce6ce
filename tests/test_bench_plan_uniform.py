"""benchmarks/bench_plan_uniform.py's parts that decide what runs: the budget, the band, the labels,
the uniform recipes (the sweep itself is the one `frankenlab plan --validate` runs, tested there)."""

import pytest

from benchmarks import bench_plan_uniform as b
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.weight_bytes import ModelShape

SMOL = ModelShape(hidden=576, intermediate=1536, layers=30, vocab=49152, tied=True, heads=9, kv_heads=3, head_dim=64)


def test_the_budget_is_width_2of4_gptq4_on_every_layer():
    assert b.thesis_budget(SMOL) == b.uniform_bytes(SMOL, 0, "2:4", 4)
    assert b.uniform_bytes(SMOL, 2, "none", 3) < b.uniform_bytes(SMOL, 0, "none", 3)
    # 3-bit codes over a pattern are stored dense (the compact form packs 2/4/8 only): the same bytes
    assert b.uniform_bytes(SMOL, 0, "1:8", 3) == b.uniform_bytes(SMOL, 0, "none", 3)


def test_labels_round_trip_and_bad_ones_are_refused():
    for depth, pattern, bits in [(0, "none", 3), (2, "2:4", 4), (4, "12:16", 8)]:
        assert b.parse_label(b.label(depth, pattern, bits)) == (depth, pattern, bits)
    for bad in ["1:none:3", "0:5:7:4", "0:none:5", "zero", "0:none"]:
        with pytest.raises(SystemExit):
            b.parse_label(bad)


@pytest.mark.parametrize("depth,pattern,bits", [(0, "none", 3), (2, "8:16", 4), (4, "3:4", 8)])
def test_uniform_recipes_load_and_evaluate_like_the_plans(depth, pattern, bits):
    recipe = Recipe.from_dict(b.uniform_recipe(depth, pattern, bits, 32))
    kinds = [s.kind for s in recipe.stages]
    assert kinds == (["depth"] if depth else []) + (["width"] if pattern != "none" else []) + ["gptq"]
    raw = b.uniform_recipe(depth, pattern, bits, 32)
    assert raw["evaluation"] == {"perplexity": ["wikitext2-concat-512"], "ppl_limit": 32, "samples": False}
    assert raw["stages"][-1] == {"kind": "gptq", "bits": bits, "group_size": 128}


def test_uniform_prediction_adds_the_reference_offset_and_the_corrections():
    import math
    from types import SimpleNamespace

    from benchmarks.bench_plan_uniform import predicted

    table = SimpleNamespace(
        options=["skip", "8:16/4", "none/3"], layers=3, offset=0.5, delta=lambda i, o: 0.0 if o == "8:16/4" else 0.1
    )
    assert predicted(table, 10.0, 0, "8:16", 4) == 10.0 * math.exp(0.5)  # the reference itself: its offset
    assert predicted(table, 10.0, 0, "none", 3, {"none/3": 0.05}) == pytest.approx(10.0 * math.exp(0.5 + 3 * 0.15))
    assert predicted(table, 10.0, 2, "none", 3) is None and predicted(table, 10.0, 0, "2:4", 4) is None
