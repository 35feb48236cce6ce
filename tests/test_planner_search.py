"""The planner's search and budgets: the knapsack against brute force, bytes against the footprint rules,
budgets and verdict facts, the recipe it writes. No model is loaded here."""

import itertools
import math
import random

import pytest

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.planner import budget as bd
from frankenlab.pipeline.planner.search import FrontPoint, LayerOptions, layer_options, solve

SMOL = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def brute_force(layers):
    """Every plan: (bytes, loss, choices)."""
    out = []
    for picks in itertools.product(*(range(len(lo.options)) for lo in layers)):
        b = sum(lo.bytes[j] for lo, j in zip(layers, picks, strict=True))
        loss = math.fsum(lo.deltas[j] for lo, j in zip(layers, picks, strict=True))
        out.append((b, loss, tuple(lo.options[j] for lo, j in zip(layers, picks, strict=True))))
    return out


def random_instance(rng, n_layers, n_opts, ties=False):
    layers = []
    for i in range(n_layers):
        k = rng.randint(1, n_opts)
        if ties:  # few distinct values: equal bytes, equal losses and equal sums everywhere
            b = [rng.choice([0, 2, 3, 5]) for _ in range(k)]
            d = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(k)]
        else:
            b = [rng.randint(0, 100) for _ in range(k)]
            d = [rng.uniform(-0.1, 2.0) for _ in range(k)]
        layers.append(LayerOptions(i, tuple(f"o{j}" for j in range(k)), tuple(b), tuple(d)))
    return layers


class FakeTable:
    def __init__(self, n, options, delta):
        self.layers = list(range(n))
        self.options = list(options)
        self._delta = delta

    def delta(self, layer, option):
        return self._delta(layer, option)


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = random_instance(rng, rng.randint(1, 5), 4, ties=seed % 2 == 0)
    fixed = rng.randint(0, 50)
    front = solve(layers, baseline_nll=1.0, fixed_bytes=fixed)
    plans = brute_force(layers)
    # the front is Pareto: bytes strictly up, loss strictly down
    for a, b in zip(front.points, front.points[1:], strict=False):
        assert a.bytes < b.bytes and a.delta > b.delta + 1e-12
    # every point is a real plan whose bytes and loss are what it says
    for p in front.points:
        assert p.bytes == fixed + sum(lo.bytes[lo.options.index(c)] for lo, c in zip(layers, p.choices, strict=True))
        assert p.delta == pytest.approx(
            math.fsum(lo.deltas[lo.options.index(c)] for lo, c in zip(layers, p.choices, strict=True))
        )
        assert p.ppl == pytest.approx(math.exp(1.0 + p.delta))
    # complete: every brute-force plan is dominated by (or equal to) a front point
    for b, loss, _ in plans:
        assert any(p.bytes - fixed <= b and p.delta <= loss + 1e-9 for p in front.points)
    # and the front holds exactly the brute-force non-dominated (bytes, loss) pairs
    best = {}
    for b, loss, _ in plans:
        best[b] = min(loss, best.get(b, math.inf))
    expected, running = [], math.inf
    for b in sorted(best):
        if best[b] < running - 1e-12:
            expected.append((b + fixed, best[b]))
            running = best[b]
    assert [(p.bytes, pytest.approx(p.delta)) for p in front.points] == expected
    # each budget: the best plan within it, or none (infeasible budgets)
    smallest = min(b for b, _, _ in plans)
    for budget in range(0, max(b for b, _, _ in plans) + 2, 7):
        got = front.best_within(budget + fixed)
        feasible = [loss for b, loss, _ in plans if b <= budget]
        if not feasible:
            assert got is None and budget < smallest
        else:
            assert got is not None and got.delta == pytest.approx(min(feasible))


def test_max_ppl_gives_the_smallest_plan_within_the_bound():
    rng = random.Random(7)
    layers = random_instance(rng, 4, 4)
    front = solve(layers, baseline_nll=0.5)
    plans = brute_force(layers)
    for bound in (1.0, 2.0, 5.0, 50.0, 1e9):
        got = front.smallest_within(bound)
        ok = [b for b, loss, _ in plans if math.exp(0.5 + loss) <= bound]
        if not ok:
            assert got is None
        else:
            assert got is not None and got.bytes == min(ok) and got.ppl <= bound


def test_ties_keep_one_deterministic_plan():
    layers = [LayerOptions(i, ("a", "b"), (1, 1), (0.0, 0.0)) for i in range(3)]
    front = solve(layers)
    assert [(p.bytes, p.delta, p.choices) for p in front.points] == [(3, 0.0, ("a", "a", "a"))]


def test_realistic_size_is_small_and_bucketing_is_reported():
    facts = bd.ModelFacts.from_config(SMOL)
    opts = ["skip"] + [f"{p}/{b}" for p in ("none", "1:8", "1:4", "2:4") for b in (16, 8, 4, 3)]
    rng = random.Random(0)
    deltas = {
        (i, o): 0.0 if o == "none/16" else rng.uniform(0, 2 if o == "skip" else 0.3) for i in range(30) for o in opts
    }
    table = FakeTable(30, opts, lambda i, o: deltas[i, o])
    layers = layer_options(table, lambda o: bd.layer_bytes(facts, o))
    front = solve(layers, fixed_bytes=bd.embed_bytes(facts))
    assert front.bucket is None and 10 < len(front.points) < 20_000
    assert front.smallest.bytes == bd.embed_bytes(facts) + 6 * bd.layer_bytes(facts, "2:4/3")  # 6 protected, 24 skipped
    # forced to bucket: reported, and every point still fits its true bytes
    small = solve(layers, fixed_bytes=0, max_states=400)
    assert small.bucket and "bucketed" in small.notes[0] and str(small.bucket) in small.notes[0]
    for p in small.points:
        assert p.bytes == sum(lo.bytes[lo.options.index(c)] for lo, c in zip(layers, p.choices, strict=True))
    exact = solve(layers, fixed_bytes=0)
    budget = exact.points[len(exact.points) // 2].bytes
    approx = small.best_within(budget)
    assert approx.bytes <= budget and approx.delta >= exact.best_within(budget).delta - 1e-9


def test_protected_layers_are_never_skipped_unless_allowed():
    table = FakeTable(10, ["skip", "none/16"], lambda i, o: -1.0 if o == "skip" else 0.0)
    plan = solve(layer_options(table, lambda o: 0 if o == "skip" else 10)).best_within(10**9)
    assert [i for i, c in enumerate(plan.choices) if c == "skip"] == [4, 5, 6, 7]
    free = solve(layer_options(table, lambda o: 0 if o == "skip" else 10, allow_protected=True))
    assert free.points[0].choices == ("skip",) * 10


# -- bytes and budgets ------------------------------------------------------------------------------
def test_layer_bytes_follow_the_footprint_rules():
    facts = bd.ModelFacts.from_config(SMOL)
    h, i, kv = 576, 1536, 192
    linears = 576 * 576 * 2 + 2 * kv * h + 3 * h * i
    assert facts.layer_params == linears
    assert bd.layer_bytes(facts, "none/16") == 2 * linears + 2 * 2 * h
    assert bd.layer_bytes(facts, "skip") == 0
    # 2:4: half the values + 2 bits of index per kept value (NVIDIA's layout)
    assert bd.layer_bytes(facts, "2:4/16") == linears // 2 * 2 + linears // 4 * 4 // 8 + 4 * h
    # int4 g128: codes + per group of 128 inputs an fp16 scale and a 4-bit zero
    groups = sum(o * math.ceil(c / 128) for o, c in facts.linear_shapes())
    assert bd.layer_bytes(facts, "none/4") == linears // 2 + groups * 2 + groups // 2 + 4 * h
    assert bd.embed_bytes(facts) == 49152 * 576 * 2 + 2 * h  # tied: once, + the final norm
    untied = bd.ModelFacts.from_config({**SMOL, "tie_word_embeddings": False})
    assert bd.embed_bytes(untied, "int8") == 2 * (49152 * 576 + 49152 * 5 * 3) + 2 * h
    assert facts.dense_bytes() == 2 * facts.params


def test_budgets():
    facts = bd.ModelFacts.from_config(SMOL)
    assert bd.parse_budget("60MiB", None, facts).bytes == 60 * 2**20
    assert bd.parse_budget("1.5 GB", None, facts).bytes == 1_500_000_000
    assert bd.parse_budget("12345", None, facts).bytes == 12345
    half = bd.parse_budget("50%", None, facts)
    assert half.bytes == facts.dense_bytes() // 2 and "dense bf16" in half.label
    sir = bd.parse_budget(None, "siracusa", facts)
    assert sir.bytes == 4 * 2**20 and sir.reserve == 0
    gpu = bd.parse_budget(None, "gtx1080ti", facts)
    # KV cache at 512 tokens: 2 x 30 layers x 3 kv heads x 64 x 512 x 2 bytes, + activations
    assert gpu.reserve > 2 * 30 * 3 * 64 * 512 * 2 and gpu.bytes == 11 * 2**30 - gpu.reserve
    assert "512 tokens" in gpu.note and "KV cache" in gpu.note
    for bad, what in (
        (("60 parsecs", None), "is not a size"),
        (("-5%", None), "percentage"),
        ((None, None), "give one budget"),
        (("1MiB", "siracusa"), "give one budget"),
        ((None, "nowhere"), "unknown target"),
    ):
        with pytest.raises(RecipeError, match=what) as err:
            bd.parse_budget(*bad, facts)
        assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="choose one of"):
        bd.embed_bytes(facts, "fp8")
    with pytest.raises(RecipeError, match="N:M"):
        bd.layer_bytes(facts, "4:2/4")


def test_pruning_that_stores_no_fewer_bytes_is_never_offered():
    """3-bit codes over an N:M pattern are stored dense: as large as none/3, so a lower measured delta
    for 1:8/3 can only be noise; the search leaves it out (and keeps patterns that do save bytes)."""
    facts = bd.ModelFacts.from_config(SMOL)
    opts = ["skip", "none/16", "none/4", "none/3", "1:8/4", "1:8/3", "2:4/3"]
    assert bd.layer_bytes(facts, "1:8/3") >= bd.layer_bytes(facts, "none/3")
    table = FakeTable(8, opts, lambda i, o: -0.5 if o in ("1:8/3", "2:4/3") else 0.1)
    layers = layer_options(table, lambda o: bd.layer_bytes(facts, o))
    assert all("1:8/3" not in lo.options and "2:4/3" not in lo.options for lo in layers)
    assert all("1:8/4" in lo.options for lo in layers) == (
        bd.layer_bytes(facts, "1:8/4") < bd.layer_bytes(facts, "none/4")
    )
    plan = solve(layers, fixed_bytes=0).best_within(10**12)
    assert "1:8/3" not in plan.choices and "2:4/3" not in plan.choices


def test_spread_takes_points_across_the_band_with_the_chosen_one():
    layers = [LayerOptions(i, ("a", "b", "c", "d"), (0, 3, 5, 9), (3.0, 1.0, 0.5, 0.0)) for i in range(4)]
    front = solve(layers)
    budget = 20
    chosen = front.best_within(budget)
    near = front.nearest(budget, 4, always=chosen)
    spread = front.spread(budget, 4, 0.5, always=chosen)
    assert chosen in spread and len(spread) == 4 and spread == sorted(spread, key=lambda p: p.bytes)
    assert all(10 <= p.bytes <= 30 for p in spread)
    width = lambda pts: max(p.bytes for p in pts) - min(p.bytes for p in pts)  # noqa: E731
    assert width(spread) > width(near)
    assert front.spread(budget, 4, 0.01) == [p for p in front.points if 19.8 <= p.bytes <= 20.2]  # fewer in band


def test_pattern_bits_are_the_widths_whose_stored_form_saves_bytes():
    """options.PATTERN_BITS (what the choice set offers with a pattern) agrees with the byte rules: at
    other widths a pattern is stored dense (the same bytes); at these a sparse enough one saves bytes
    (whether a given pattern does is the search's check: 2:4 at 2 bits costs what dense 2-bit does)."""
    from frankenlab.pipeline.planner.options import FLOAT_BITS, PATTERN_BITS, QUANT_BITS

    facts = bd.ModelFacts.from_config(SMOL)
    for bits in (FLOAT_BITS, *QUANT_BITS):
        dense = bd.layer_bytes(facts, f"none/{bits}")
        if bits in PATTERN_BITS:
            assert bd.layer_bytes(facts, f"12:16/{bits}") < dense, bits
        else:
            assert bd.layer_bytes(facts, f"12:16/{bits}") == bd.layer_bytes(facts, f"2:4/{bits}") == dense, bits


def test_an_offset_moves_every_point_and_the_calibration_leaves_it_unscaled():
    from frankenlab.pipeline.planner.validate import Measured, calibrate

    layers = [LayerOptions(i, ("a", "b"), (1, 2), (0.2, -0.1)) for i in range(3)]
    plain, moved = solve(layers, baseline_nll=1.0), solve(layers, baseline_nll=1.0, offset=0.5)
    assert [p.choices for p in plain.points] == [p.choices for p in moved.points] and moved.offset == 0.5
    for a, b in zip(plain.points, moved.points, strict=True):
        assert b.delta == pytest.approx(a.delta + 0.5) and b.ppl == pytest.approx(math.exp(1.5 + a.delta))
    # measured changes of exactly offset + 2 x the deltas: a common multiplier of 2, the offset untouched
    deltas = {"skip": 0.3, "none/4": 0.1}
    points = [FrontPoint(0, 0.5 + 2 * 0.3 * k, 0.0, ("skip",) * k + ("none/4",) * (3 - k)) for k in range(3)]
    rows = []
    for k, p in enumerate(points):
        y = 0.5 + 2 * (0.3 * k + 0.1 * (3 - k))
        rows.append(Measured(p, f"p{k}", "done", measured_ppl=10 * math.exp(y), baseline_ppl=10.0))
    cal = calibrate(rows, lambda pos, o: deltas[o], offset=0.5)
    assert cal.multipliers["skip"] == pytest.approx(2) and cal.multipliers["quant"] == pytest.approx(2)
    assert cal.rms_after == pytest.approx(0, abs=1e-9)
