"""Per-layer sensitivities (issue 27): options, one-layer edits, the cached pass, its file, resume, cancel, heat map."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.calibration import CalibrationConfig
from frankenlab.pipeline.layerwise import LayerInput, input_square_sums, linear_modules
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.planner import layer_edit, sensitivity
from frankenlab.pipeline.planner.options import OptionError, choice_set, option_name, parse_option
from frankenlab.pipeline.planner.sensitivity import SensitivityTable, load_cached, measure_sensitivities, model_digest
from frankenlab.pipeline.plans import LayerPlan, planned
from frankenlab.pipeline.stages.width import ALL_PROJECTIONS, nm_prune_mask, satisfies_nm, wanda_scores

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"patterns": ("none", "2:4"), "bits": (16, 4), "group_size": 32}  # 5 options per layer, 4 measured


def _ids(tiny, n=3, t=40, seed=0):
    return torch.randint(0, len(tiny.tokenizer), (n, t), generator=torch.Generator().manual_seed(seed))


def _cal(tiny):
    """Calibration windows (the edits' statistics), other text than the scored windows."""
    return _ids(tiny, n=4, seed=7)


def _same(a: SensitivityTable, b: SensitivityTable) -> bool:
    """The same numbers (a recomputed table's seconds differ)."""
    return a.key() == b.key() and a.deltas == b.deltas and a.baseline_nll == b.baseline_nll


@torch.no_grad()
def _nll(model, ids) -> float:
    logits = model(ids).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _layer_input(model, ids, layer: int) -> tuple[torch.Tensor, dict]:
    got = {}

    def hook(_m, args, kwargs):
        got["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        got["kw"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}

    h = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got["x"], got["kw"]


# -- options -----------------------------------------------------------------------------------------
def test_option_names_round_trip_and_refuse_bad_ones():
    assert option_name("2:4", 4) == "2:4/4" and option_name(" 1 : 8 ", "16") == "1:8/16"
    assert parse_option("2:4/4") == ("2:4", 4) and parse_option("2:4/4").nm == (2, 4)
    assert parse_option("skip").skip and parse_option("none/16").unchanged and parse_option("none/3").quantized
    assert choice_set(["none", "2:4"], [16, 4]) == ["skip", "none/16", "none/4", "2:4/16", "2:4/4"]
    assert choice_set(["dense"], [8], skip=False) == ["none/8"]
    # N:M at 3 bits is stored dense (pipeline.weight_bytes): never offered, never measured
    assert choice_set(["none", "2:4", "8:16"], [4, 3]) == ["skip", "none/4", "none/3", "2:4/4", "8:16/4"]
    with pytest.raises(OptionError, match="stored dense"):
        choice_set(["2:4"], [3])
    for bad in ("2:4", "4:2/4", "2:4/5", "x/4", "2:4/four", ""):
        with pytest.raises(OptionError, match="skip|pattern|bits|N:M"):
            parse_option(bad)


# -- one-layer edits ---------------------------------------------------------------------------------
def test_rtn_is_on_the_group_grid_and_keeps_zeros():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[:, ::4] = 0
    for sym in (True, False):
        q = layer_edit.rtn(w, bits=3, group_size=32, sym=sym)
        assert bool((q[:, ::4] == 0).all())  # a zero rounds to the zero point, which dequantizes to 0
        for a in (0, 32):
            for row in q[:, a : a + 32]:
                assert len(torch.unique(row)) <= 8  # 3 bits: at most 8 levels per group and row
        assert (q - w).abs().max() < w.abs().max() / 3


def test_gptq_beats_rounding_on_correlated_inputs_and_holds_pruned_weights():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated features
    w = torch.randn(32, 64, generator=g)
    keep = nm_prune_mask(wanda_scores(w, x.square().sum(0)), 2, 4)
    w = w * keep
    h = x.T @ x
    q = layer_edit.gptq(w, h, bits=3, group_size=32, sym=True, keep_zero=~keep)
    r = layer_edit.rtn(w, bits=3, group_size=32, sym=True)
    assert bool((q[~keep] == 0).all()) and satisfies_nm(q, 2, 4)
    err_q = float((x @ (w - q).T).square().sum())
    err_r = float((x @ (w - r).T).square().sum())
    assert err_q < 0.9 * err_r  # masked: the pruned weights cannot take up error (measured 0.82)
    dense = torch.randn(32, 64, generator=g)
    q, r = (
        f(dense, bits=3, group_size=32, sym=True) for f in (lambda d, **k: layer_edit.gptq(d, h, **k), layer_edit.rtn)
    )
    assert float((x @ (dense - q).T).square().sum()) < 0.7 * float((x @ (dense - r).T).square().sum())  # measured 0.51


def test_gptq_runs_on_one_thread_and_gives_the_threads_back(monkeypatch):
    seen = []
    real = layer_edit.gptq
    monkeypatch.setattr(layer_edit, "gptq", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    torch.set_num_threads(2)
    lin = torch.nn.Linear(32, 8)
    layer = torch.nn.Module()
    layer.q_proj = lin
    x = torch.randn(64, 32)
    stats = {"q_proj": (x.square().sum(0), x.T @ x)}
    got = layer_edit.option_weights(layer, stats, [parse_option("1:4/4")], group_size=16, sym=True, method="gptq")
    assert seen == [1] and torch.get_num_threads() == 2 and satisfies_nm(got["1:4/4"]["q_proj"], 1, 4)


def test_layer_options_are_the_width_stage_then_quantization_and_the_model_is_restored(tiny):
    model, ids = tiny.model, _ids(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = decoder_layers(model)[3]
    x, kw = _layer_input(model, ids, 3)
    stats = layer_edit.layer_stats(layer, x, kw, need_h=True)
    opts = [parse_option(o) for o in ("2:4/16", "2:4/4", "none/3", "1:8/8")]
    got = layer_edit.option_weights(layer, stats, opts, group_size=32, sym=True, method="gptq")
    out = layer_edit.run_with(layer, got["2:4/4"], x, kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    linears = linear_modules(layer, ALL_PROJECTIONS)
    sq = input_square_sums(layer, linears, [LayerInput(x, kw)])  # the width stage's "layer" statistics
    for name, lin in linears.items():
        pruned = lin.weight * nm_prune_mask(wanda_scores(lin.weight, sq[name]), 2, 4)
        torch.testing.assert_close(got["2:4/16"][name], pruned)
        assert satisfies_nm(got["2:4/4"][name], 2, 4) and bool((got["2:4/4"][name][pruned == 0] == 0).all())
        assert satisfies_nm(got["1:8/8"][name], 1, 8)
        for a in range(0, lin.in_features, 32):
            for row in got["none/3"][name][:, a : a + 32]:
                assert len(torch.unique(row)) <= 8
        # stacking options in one GPTQ run gives what one run per option gives
        alone = layer_edit.gptq(pruned, stats[name][1], bits=4, group_size=32, sym=True, keep_zero=pruned == 0)
        torch.testing.assert_close(got["2:4/4"][name], alone)
    assert not torch.equal(out, layer_edit.run_with(layer, got["2:4/16"], x, kw))


# -- the pass ----------------------------------------------------------------------------------------
def test_entries_equal_a_full_recompute_of_the_changed_model(tiny, tmp_path):
    model, ids = tiny.model, _ids(tiny)
    table = measure_sensitivities(
        model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), method="rtn", cache_dir=tmp_path, **SMALL
    )
    base = _nll(model, ids)
    assert table.baseline_nll == pytest.approx(base, rel=1e-5)
    assert table.options == ["skip", "none/16", "none/4", "2:4/16", "2:4/4"] and table.layers == 8
    assert table.complete and table.delta(5, "none/16") == 0.0 and table.tokens == 3 * 39
    for li in (0, 4, 7):
        with planned(model, LayerPlan.without(8, [li])):
            assert table.delta(li, "skip") == pytest.approx(_nll(model, ids) - base, abs=2e-5)
        ref = copy.deepcopy(model)  # none/4 by RTN does not depend on inputs: quantize the weights in place
        for lin in linear_modules(decoder_layers(ref)[li], ALL_PROJECTIONS).values():
            lin.weight.data = layer_edit.rtn(lin.weight.data, bits=4, group_size=32, sym=True)
        assert table.delta(li, "none/4") == pytest.approx(_nll(ref, ids) - base, abs=2e-5)
    assert any(abs(table.delta(li, o)) > 1e-3 for li in range(8) for o in ("skip", "2:4/16", "2:4/4"))
    with pytest.raises(KeyError, match="layer 9"):
        table.delta(9, "skip")
    assert SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_cached_table_is_reused_and_refused_when_hostile(tiny, tmp_path, monkeypatch):
    model, tok, ids = tiny.model, tiny.tokenizer, _ids(tiny)
    computed = []
    real = sensitivity._Pass.entry
    monkeypatch.setattr(
        sensitivity._Pass, "entry", lambda self, li, o, w: computed.append((li, o.name)) or real(self, li, o, w)
    )
    first = measure_sensitivities(model, tok, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL)
    assert len(computed) == 8 * 4
    files = list((tmp_path / "sensitivity").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith(model_digest(model)[:16])
    computed.clear()
    again = measure_sensitivities(model, tok, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL)
    assert computed == [] and again == first
    got = load_cached(
        model_digest(model), n_layers=8, tokens=3 * 39, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL
    )
    assert got == first
    assert (
        load_cached(model_digest(model), windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL) == first
    )  # the key alone
    assert (
        load_cached(model_digest(model), n_layers=9, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL)
        is None
    )
    other = measure_sensitivities(
        model, tok, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, method="rtn", **SMALL
    )
    assert len(computed) == 32 and other.method == "rtn"  # another method: another key, another file
    path = files[0]
    for hostile in (
        "{not json",
        json.dumps({"format": "frankenlab-sensitivities", "version": 1, "key": []}),
        json.dumps(first.to_dict()).replace('"2:4/4"', '"9:4/4"'),
        "[]" * 10000,
    ):
        path.write_text(hostile)
        lines, computed[:] = [], []
        table = measure_sensitivities(
            model, tok, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, log=lines.append, **SMALL
        )
        assert len(computed) == 32 and _same(table, first)
        assert len(lines) == 1 and "refusing the cache file" in lines[0] and "measuring again" in lines[0]
    bad = first.to_dict()
    bad["deltas"]["3"]["skip"] = float("nan")
    path.write_text(json.dumps(bad))
    assert (
        load_cached(
            first.model_digest, n_layers=8, tokens=117, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL
        )
        is None
    )
    path.unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(first.to_dict()))
    path.symlink_to(target)  # a link is neither read nor written through
    lines, computed[:] = [], []
    table = measure_sensitivities(
        model, tok, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, log=lines.append, **SMALL
    )
    assert len(computed) == 32 and _same(table, first) and json.loads(target.read_text()) == first.to_dict()
    assert any("symbolic link" in line for line in lines)


def test_evaluation_text_and_unfit_choices_are_refused(tiny, tmp_path):
    with pytest.raises(RecipeError, match="never evaluation data"):
        measure_sensitivities(
            tiny.model, tiny.tokenizer, windows=CalibrationConfig("wikitext2", 2, 32), cache_dir=tmp_path
        )
    with pytest.raises(RecipeError, match="multiples of M=3"):
        measure_sensitivities(
            tiny.model,
            tiny.tokenizer,
            windows=_ids(tiny),
            calibration=_cal(tiny),
            patterns=("1:3",),
            cache_dir=tmp_path,
        )
    with pytest.raises(RecipeError, match="method"):
        measure_sensitivities(
            tiny.model, tiny.tokenizer, windows=_ids(tiny), calibration=_cal(tiny), method="awq", cache_dir=tmp_path
        )


def test_calibration_windows_are_recorded(tiny, tmp_path, data_dir):
    table = measure_sensitivities(
        tiny.model,
        tiny.tokenizer,
        windows=CalibrationConfig("c4", 2, 32, seed=3),
        data_dir=data_dir,
        cache_dir=tmp_path,
        layers=[7],
        **SMALL,
    )
    assert table.windows == "c4 2x32 seed 3 (calibration)" and table.tokens == 62
    assert table.calibration == "c4 32x128 seed 0 (calibration)"  # the stages' own calibration, by default
    assert not table.complete and set(table.deltas) == {7}


def _rtn_all(model, bits: int, group_size: int = 32):
    """A copy of `model` with every decoder projection rounded to nearest (RTN needs no statistics)."""
    ref = copy.deepcopy(model)
    for layer in decoder_layers(ref):
        for lin in linear_modules(layer, ALL_PROJECTIONS).values():
            lin.weight.data = layer_edit.rtn(lin.weight.data, bits=bits, group_size=group_size, sym=True)
    return ref


def _rtn_around(tiny, tmp_path, around="none/4"):
    """The tiny model's table around every layer at `around`, by RTN (no statistics: easy to recompute)."""
    return measure_sensitivities(
        tiny.model,
        tiny.tokenizer,
        windows=_ids(tiny),
        calibration=_cal(tiny),
        method="rtn",
        around=around,
        cache_dir=tmp_path,
        **SMALL,
    )


def test_around_a_reference_each_entry_changes_one_layer_of_it(tiny, tmp_path):
    model, ids = tiny.model, _ids(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = _rtn_around(tiny, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model is given back"
    ref = _rtn_all(model, 4)
    base, ref_nll = _nll(model, ids), _nll(ref, ids)
    assert table.around == "none/4" and table.reference_nll == pytest.approx(ref_nll, abs=2e-5)
    assert table.baseline_nll == pytest.approx(base, abs=2e-5) and table.offset == pytest.approx(
        ref_nll - base, abs=4e-5
    )
    assert table.complete and table.delta(3, "none/4") == 0.0 and "none/4" not in table.measured_options()
    for li in (0, 5, 7):
        with planned(ref, LayerPlan.without(8, [li])):
            assert table.delta(li, "skip") == pytest.approx(_nll(ref, ids) - ref_nll, abs=2e-5)
        own = copy.deepcopy(ref)  # layer li back at its own weights, the others at the reference
        for name, lin in linear_modules(decoder_layers(own)[li], ALL_PROJECTIONS).items():
            lin.weight.data = linear_modules(decoder_layers(model)[li], ALL_PROJECTIONS)[name].weight.data.clone()
        assert table.delta(li, "none/16") == pytest.approx(_nll(own, ids) - ref_nll, abs=2e-5)
    # the search: the uniform reference is a plan whose predicted change is the offset alone
    from frankenlab.pipeline.planner import budget as bd
    from frankenlab.pipeline.planner.search import solve_table

    facts = bd.ModelFacts.from_config(model.config.to_dict())
    front = solve_table(table, facts, 32, 0)
    uniform = 8 * bd.layer_bytes(facts, "none/4", 32)
    best = front.best_within(uniform)
    assert front.offset == table.offset and best.delta <= table.offset + 1e-12
    assert best.ppl <= math.exp(table.reference_nll) * (1 + 1e-9)
    # its own cache file, read back whole; the reference is not the unmodified model's table
    again = load_cached(
        model_digest(model),
        windows=ids,
        calibration=_cal(tiny),
        method="rtn",
        around="none/4",
        cache_dir=tmp_path,
        **SMALL,
    )
    assert _same(again, table) and again.reference_nll == table.reference_nll
    assert (
        load_cached(model_digest(model), windows=ids, calibration=_cal(tiny), method="rtn", cache_dir=tmp_path, **SMALL)
        is None
    )
    with pytest.raises(RecipeError, match="not one of the choice set"):
        measure_sensitivities(
            model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), around="1:8/4", cache_dir=tmp_path, **SMALL
        )
    with pytest.raises(RecipeError, match="cannot be 'skip'"):
        measure_sensitivities(
            model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), around="skip", cache_dir=tmp_path, **SMALL
        )


def test_plans_are_built_as_the_stages_would_and_measured_whole(tiny, tmp_path):
    from frankenlab.pipeline.planner import reference
    from frankenlab.pipeline.planner.search import layer_options
    from frankenlab.pipeline.planner.sensitivity import measure_plans

    model, ids = tiny.model, _ids(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = [["none/4"] * 8, ["none/16"] * 3 + ["skip"] + ["none/16"] * 4]
    base, (rtn4, skip3) = measure_plans(
        model, tiny.tokenizer, plans, windows=ids, calibration=_cal(tiny), method="rtn", group_size=32
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert base == pytest.approx(_nll(model, ids), abs=2e-5) and rtn4 == pytest.approx(
        _nll(_rtn_all(model, 4), ids), abs=2e-5
    )
    with planned(model, LayerPlan.without(8, [3])):
        assert skip3 == pytest.approx(_nll(model, ids), abs=2e-5)
    with pytest.raises(RecipeError, match="one option per decoder layer"):
        measure_plans(model, tiny.tokenizer, [["none/4"] * 7], windows=ids, calibration=_cal(tiny))
    # interaction corrections: with each option's share added, the additive model is exact at both ends
    table = _rtn_around(tiny, tmp_path)
    uniform = {
        "none/16": base,
        "2:4/4": measure_plans(
            model, tiny.tokenizer, [["2:4/4"] * 8], windows=ids, calibration=_cal(tiny), method="rtn", group_size=32
        )[1][0],
    }
    shifts = reference.corrections(table, uniform)
    assert set(shifts) == {"none/16", "2:4/4"}
    from frankenlab.pipeline.planner import budget as bd

    facts = bd.ModelFacts.from_config(model.config.to_dict())
    sizes = lambda o: bd.layer_bytes(facts, o, 32)  # noqa: E731
    layers = layer_options(table, sizes, allow_protected=True, shift=lambda o: shifts.get(o, 0.0))
    for option, nll in uniform.items():
        predicted = table.offset + math.fsum(lo.deltas[lo.options.index(option)] for lo in layers)
        assert predicted == pytest.approx(nll - table.baseline_nll, abs=1e-9)
    assert table.reference_nll == pytest.approx(rtn4, abs=1e-6)  # the reference is the uniform plan, measured


def test_reference_alone_is_measured_with_no_layers(tiny, tmp_path):
    model, ids = tiny.model, _ids(tiny)
    table = measure_sensitivities(
        model,
        tiny.tokenizer,
        windows=ids,
        calibration=_cal(tiny),
        around="2:4/4",
        layers=[],
        cache_dir=tmp_path,
        **SMALL,
    )
    assert not table.deltas and math.isfinite(table.reference_nll) and table.reference_nll != table.baseline_nll
    stored = load_cached(
        model_digest(model), windows=ids, calibration=_cal(tiny), around="2:4/4", cache_dir=tmp_path, **SMALL
    )
    assert stored.reference_nll == table.reference_nll  # stored for --around auto's next run
    full = measure_sensitivities(
        model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), around="2:4/4", cache_dir=tmp_path, **SMALL
    )
    assert full.complete and full.reference_nll == pytest.approx(table.reference_nll, abs=1e-9)


def test_statistics_come_from_the_calibration_windows_never_the_scored_ones(tiny, tmp_path):
    model, ids = tiny.model, _ids(tiny)
    with pytest.raises(RecipeError, match="share a window"):
        measure_sensitivities(
            model, tiny.tokenizer, windows=ids, calibration=torch.cat([_cal(tiny), ids[1:2]]), **SMALL
        )
    a = measure_sensitivities(
        model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), layers=[6], store=False, **SMALL
    )
    b = measure_sensitivities(
        model, tiny.tokenizer, windows=ids, calibration=_ids(tiny, n=4, seed=11), layers=[6], store=False, **SMALL
    )
    assert a.delta(6, "skip") == b.delta(6, "skip")  # no statistics in a skip
    assert a.delta(6, "2:4/4") != b.delta(6, "2:4/4") and a.delta(6, "none/4") != b.delta(6, "none/4")
    assert a.calibration != b.calibration and a.key_hash() != b.key_hash()


def test_cancel_keeps_finished_entries_and_the_model(tiny, tmp_path):
    model, ids = tiny.model, _ids(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    with pytest.raises(Cancelled):
        measure_sensitivities(
            model,
            tiny.tokenizer,
            windows=ids,
            calibration=_cal(tiny),
            cache_dir=tmp_path,
            cancel=lambda: len(seen) >= 7,
            progress=lambda f, text: seen.append((f, text)),
            **SMALL,
        )
    assert seen[:3] == [
        (0.0, "layer 1/8, preparing"),
        (0.0, "layer 1/8, option skip"),
        (1 / 32, "layer 1/8, option none/4"),
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    partial = load_cached(
        model_digest(model), n_layers=8, tokens=117, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path, **SMALL
    )
    assert sum(map(len, partial.deltas.values())) == 4  # layer 1's four; layer 2's skip was cancelled inside
    full = measure_sensitivities(
        model,
        tiny.tokenizer,
        windows=ids,
        calibration=_cal(tiny),
        cache_dir=tmp_path,
        progress=lambda f, t: None,
        **SMALL,
    )
    assert full.complete and all(
        full.delta(li, o) == partial.delta(li, o) for li, row in partial.deltas.items() for o in row
    )


CHILD = """
import sys, time, torch
from frankenlab.pipeline.loading import load_model
from frankenlab.pipeline.planner.sensitivity import measure_sensitivities
torch.set_num_threads(1)
lm = load_model(sys.argv[1], device="cpu", dtype="float32")
ids = torch.randint(0, len(lm.tokenizer), (3, 40), generator=torch.Generator().manual_seed(0))
cal = torch.randint(0, len(lm.tokenizer), (4, 40), generator=torch.Generator().manual_seed(7))
measure_sensitivities(lm.model, lm.tokenizer, windows=ids, calibration=cal, cache_dir=sys.argv[2], patterns=("none", "2:4"),
                      bits=(16, 4), group_size=32, progress=lambda f, t: time.sleep(0.3))
"""


def test_resumes_after_kill_9_without_recomputing_finished_entries(tiny, tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model_dir), str(cache)], cwd=ROOT)
    try:
        stored: dict = {}
        while proc.poll() is None:
            files = list((cache / "sensitivity").glob("*.json"))
            if files:
                try:
                    stored = json.loads(files[0].read_text())["deltas"]
                except (OSError, ValueError):
                    pass
            if sum(map(len, stored.values())) >= 4:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child ended before it was killed"
    stored = json.loads(files[0].read_text())["deltas"]  # the file as the kill left it: whole
    done = {(int(li), o) for li, row in stored.items() for o in row}
    assert 4 <= len(done) < 32
    computed = []
    real = sensitivity._Pass.entry
    monkeypatch.setattr(
        sensitivity._Pass, "entry", lambda self, li, o, w: computed.append((li, o.name)) or real(self, li, o, w)
    )
    ids = _ids(tiny)
    resumed = measure_sensitivities(
        tiny.model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), cache_dir=cache, **SMALL
    )
    assert resumed.complete and not done & set(computed) and len(computed) == 32 - len(done)
    fresh = measure_sensitivities(
        tiny.model, tiny.tokenizer, windows=ids, calibration=_cal(tiny), cache_dir=tmp_path / "fresh", **SMALL
    )
    for li in range(8):
        for o in fresh.options:
            assert resumed.delta(li, o) == pytest.approx(fresh.delta(li, o), abs=1e-6)


# -- the heat map ------------------------------------------------------------------------------------
def test_heat_map_cells_and_colour_order():
    from rich.console import Console

    from frankenlab.tui.widgets.sensitivity_map import cell, heat_table

    table = SensitivityTable("d" * 64, 3, ("none", "2:4"), (16, 4), 128, "gptq", True, "c4 4x256 seed 0", 1020)
    table.baseline_nll = 3.2
    values = {"skip": [2.5, 0.4, 0.9], "none/4": [0.004, 0.001, -0.002], "2:4/16": [0.3, 0.05, 0.1]}
    for o, col in values.items():
        for li, d in enumerate(col):
            table.put(li, o, d, 1.0)
    console = Console(width=160, record=True, color_system="truecolor")
    console.print(heat_table(table))
    text = console.export_text()
    assert "+2.50" in text and "+0.004" in text and "-0.002" in text and "·" in text  # 2:4/4 not measured
    assert "12/15 entries" in text  # 9 measured + 3 unchanged
    top = 2.5
    reds = [int(str(cell(d, top).style.color.triplet.hex)[1:3], 16) for d in (0.001, 0.05, 0.4, 2.5)]
    greens = [int(str(cell(d, top).style.color.triplet.hex)[3:5], 16) for d in (0.001, 0.05, 0.4, 2.5)]
    assert reds == sorted(reds) and reds[0] < reds[-1] and greens[-1] < greens[0]
    assert cell(-0.002, top).style.color.triplet.hex != cell(0.002, top).style.color.triplet.hex
    assert cell(None, top).plain == "·" and cell(0.1, top, "none/16").plain == "0"


async def test_heat_map_widget_shows_a_table_as_it_fills():
    from textual.app import App

    from frankenlab.tui.widgets.sensitivity_map import SensitivityMap

    table = SensitivityTable(
        "d" * 64, 2, ("none",), (16, 4), 128, "gptq", True, "c4 4x128 seed 0", 508, baseline_nll=3.0
    )

    class Lab(App):
        def compose(self):
            yield SensitivityMap()

    async with Lab().run_test(size=(120, 12)) as pilot:
        heat = pilot.app.query_one(SensitivityMap)
        empty = "\n".join(strip.text for strip in heat.render_lines(heat.region.reset_offset))
        assert "no sensitivities measured yet" in empty
        table.put(1, "skip", 0.75, 1.0)
        heat.show(table)
        await pilot.pause()
        rendered = "\n".join(strip.text for strip in heat.render_lines(heat.region.reset_offset))
        assert "+0.750" in rendered and "·" in rendered and "3/6" in rendered
