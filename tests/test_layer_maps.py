"""Per-layer settings (issue 27): the layer-range map field type, per-layer width patterns and
per-layer GPTQ bits, and everything that accounts for them (footprint, compact file, forms,
sessions, sweeps, the planner's pure byte function)."""

import pytest
import torch

from frankenlab.evals.config import config_fields, from_dict, to_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.layer_map import IntLayerMap, TextLayerMap, parse_text
from frankenlab.pipeline.calibration import CalibrationConfig
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.layerwise import linear_modules
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.stages import width

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the field type ----------------------------------------------------------------------------------
def test_map_parses_ranges_lists_and_bare_numbers():
    pm = TextLayerMap.parse({"0-3": "None", "4-5,7": " 2:4 ", "6": "1:8", 8: "2:4"})
    assert [pm.for_layer(i) for i in range(10)] == ["none"] * 4 + ["2:4", "2:4", "1:8", "2:4", "2:4", None]
    assert pm.for_layer(42, "dflt") == "dflt"
    assert pm.layers() == list(range(9))
    assert pm.values() == ["none", "2:4", "1:8"]


def test_canonical_form_is_sorted_and_merged():
    a = TextLayerMap.parse({"7-8": "2:4", "0-1": "none", "2": "none", "4-6": "2:4", "3": "2:4"})
    b = TextLayerMap.parse({"0-2": "none", "3-8": "2:4"})
    assert a.to_dict() == {"0-2": "none", "3-8": "2:4"} == b.to_dict()
    assert list(a.to_dict()) == ["0-2", "3-8"] and a == b and hash(a) == hash(b)
    assert a.text() == "0-2=none, 3-8=2:4"
    # the text form round-trips, commas inside a key included
    assert TextLayerMap.parse(a.text()) == a
    assert parse_text("4-13,20=1:8; 0-3=none") == {"4-13,20": "1:8", "0-3": "none"}
    assert TextLayerMap.parse("4-5,9=1:8, 0=none").to_dict() == {"0": "none", "4-5": "1:8", "9": "1:8"}
    assert IntLayerMap.parse("0-1=8, 2-3=4").to_dict() == {"0-1": 8, "2-3": 4}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"0-3": "2:4", "3-5": "1:8"}, r"both name layer\(s\) 3"),
        ({"0-3,2": "2:4"}, r"both name layer\(s\) 2"),
        ({"a-b": "2:4"}, "is not a layer number or range"),
        ({"5-3": "2:4"}, "runs backwards; write 3-5"),
        ({"-1": "2:4"}, "is not a layer number or range"),
        ({}, "names no layer"),
        ({"0": 3}, "expected text"),
        ("0-3", "has no value"),
        ("0-3=", "needs a layer range and a value"),
        ([1, 2], "expected a table of layer ranges"),
    ],
)
def test_map_refusals_are_one_line(data, message):
    with pytest.raises(RecipeError, match=message) as err:
        TextLayerMap.parse(data, "width.patterns")
    assert "\n" not in str(err.value) and str(err.value).startswith("width.patterns")


def test_int_map_values():
    assert IntLayerMap.parse({"0": "8", "1": 4.0}).to_dict() == {"0": 8, "1": 4}
    with pytest.raises(RecipeError, match="expected a whole number"):
        IntLayerMap.parse({"0": "eight"})
    bits = IntLayerMap.parse({"0-3": 8, "4-9": 4})
    bits.check_layers(10)
    with pytest.raises(RecipeError, match=r"layer 8 \(key '4-9'\) does not exist: the model has 8 layers"):
        bits.check_layers(8, "layer_bits")


# -- width -------------------------------------------------------------------------------------------
def _ctx(tiny, data_dir):
    return StageContext(tiny.tokenizer, tiny.device, CalibrationConfig(samples=8, seq_len=64), data_dir)


MIXED = {"0-1": "none", "2-4": "1:8", "5-6": "2:4"}  # layer 7: the default


@pytest.mark.parametrize("sequential", ["projection", "layer"])
def test_per_layer_patterns_hold_per_layer(tiny, data_dir, sequential):
    dense = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    cfg = from_dict(width.Config, {"patterns": MIXED, "pattern": "4:8", "sequential": sequential}, "width")
    result = width.run(tiny.model, _ctx(tiny, data_dir), cfg)
    expect = {0: None, 1: None, 2: (1, 8), 3: (1, 8), 4: (1, 8), 5: (2, 4), 6: (2, 4), 7: (4, 8)}
    for li, layer in enumerate(decoder_layers(result.model)):
        for name, lin in linear_modules(layer, width.ALL_PROJECTIONS).items():
            w = lin.weight
            if expect[li] is None:  # left dense: untouched
                assert torch.equal(w, dense[f"model.layers.{li}.{name}.weight"])
                continue
            n, m = expect[li]
            zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
            assert (zeros == n).all(), f"layer {li} {name}: every group of {m} holds {n} zeros"
    report = result.report
    assert report["pattern_holds"] is True
    rows = report["by_layer"]
    assert [r["pattern"] for r in rows] == ["none", "none", "1:8", "1:8", "1:8", "2:4", "2:4", "4:8"]
    assert [r["density"] for r in rows] == pytest.approx([1, 1, 7 / 8, 7 / 8, 7 / 8, 0.5, 0.5, 0.5])
    assert all(r["pattern_holds"] for r in rows)
    # verify checks each layer against its own pattern: 1:8 layers do not hold 2:4
    assert not width.verify(result.model, from_dict(width.Config, {"pattern": "2:4"}, "width"))
    holds_2of4 = width.layers_holding(result.model, from_dict(width.Config, {"pattern": "2:4"}, "width"))
    assert holds_2of4 == [False] * 5 + [True, True, False]  # 4:8 is not 2:4 either


def test_width_map_config_semantics():
    only_map = from_dict(width.Config, {"patterns": {"4-5": "2:4"}}, "width")
    assert [only_map.setting(i) for i in (3, 4, 5, 6)] == [None, (2, 4), (2, 4), None]  # unnamed: dense
    with_ratio = from_dict(width.Config, {"patterns": {"0": "1:8"}, "ratio": 0.3}, "width")
    assert with_ratio.setting(0) == (1, 8) and with_ratio.setting(1) == 0.3
    assert only_map.to_dict()["patterns"] == {"4-5": "2:4"} and "pattern" not in only_map.to_dict()
    spelled = from_dict(width.Config, {"patterns": {"0": " 2 : 4 ", "1": "NONE"}, "pattern": "1:8"}, "width")
    assert spelled.to_dict()["patterns"] == {"0": "2:4", "1": "none"} and spelled.to_dict()["pattern"] == "1:8"
    assert from_dict(width.Config, spelled.to_dict(), "width") == spelled
    assert {f.name for f in config_fields(width.Config) if f.form} >= {"patterns"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"patterns": {"0-3": "4:4"}}, r"patterns\['0-3'\]: N must be smaller than M"),
        ({"patterns": {"0-3": "half"}}, "is not of the form N:M"),
        ({"patterns": {"0-3": "none"}}, "nothing would be pruned"),
        ({"patterns": {"0-3": "2:4", "2": "1:8"}}, "both name layer"),
        ({"patterns": "0-3"}, "has no value"),
    ],
)
def test_width_map_refusals(data, message):
    with pytest.raises(RecipeError, match=message) as err:
        from_dict(width.Config, data, "width")
    assert "\n" not in str(err.value)


def test_describe_mixed_width():
    params = {"patterns": {"0-3": "none", "4-13": "1:8", "14-21": "2:4"}}
    assert width.describe(params) == "Width mixed 1:8/2:4 (18 layers)"
    assert width.describe({**params, "pattern": "2:4"}) == "Width mixed 1:8/2:4 (18 layers, others 2:4)"
    assert (
        width.describe({"patterns": {"3": "2:4"}, "ratio": 0.5}) == "Width mixed 2:4 (1 layer, others 50% unstructured)"
    )
    assert width.describe({"pattern": "2:4"}) == "Width 2:4"


# -- width + GPTQ per layer through the runner, then everything that reads the result ------------------
MIXED_RECIPE = """
name = "mixed"
model = "{model}"
[calibration]
samples = 8
seq_len = 32
[evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
[[stages]]
kind = "width"
patterns = {{ "0-1" = "none", "2-4" = "1:8", "5-6" = "2:4" }}
method = "magnitude"
[[stages]]
kind = "gptq"
bits = 4
group_size = 32
samples = 8
seq_len = 32
layer_bits = {{ "0-1" = 8, "6" = 16, "7" = 2 }}
layer_group_size = {{ "7" = 64 }}
[[stages]]
kind = "eora"
rank = 4
samples = 8
seq_len = 32
"""
# layer: (pattern, bits, group) as the recipe above gives them
LAYER_CHOICES = {
    0: (None, 8, 32),
    1: (None, 8, 32),
    2: ((1, 8), 4, 32),
    3: ((1, 8), 4, 32),
    4: ((1, 8), 4, 32),
    5: ((2, 4), 4, 32),
    6: ((2, 4), None, None),
    7: (None, 2, 64),
}


@pytest.fixture(scope="module")
def mixed_run(tiny_model_dir, data_dir, tmp_path_factory):
    import os
    from pathlib import Path

    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import record_run

    out = tmp_path_factory.mktemp("mixed") / "run"
    cwd, scratch = Path.cwd(), tmp_path_factory.mktemp("cwd")
    os.chdir(scratch)  # gptqmodel writes ./logs
    try:
        session = record_run(Recipe.loads(MIXED_RECIPE.format(model=tiny_model_dir)), out, data_dir=data_dir)
    finally:
        os.chdir(cwd)
    assert session.status == "done", session.message
    return session, out


def test_mixed_bits_gptq_reports_and_keeps_every_zero(mixed_run):
    import json
    import math
    from pathlib import Path

    session, _ = mixed_run
    by_kind = {s.kind: s for s in session.stages}
    assert by_kind["width"].report["pattern_holds"] is True
    report = by_kind["gptq"].report
    assert [(r["bits"], r["group_size"]) for r in report["by_layer"]] == [
        (8, 32),
        (8, 32),
        (4, 32),
        (4, 32),
        (4, 32),
        (4, 32),
        (16, None),
        (2, 64),
    ]
    assert report["layers_unquantized"] == 1 and report["quantized_linears"] == 7 * 7
    assert report["pattern_holds"] is True  # masked GPTQ kept the zeros; the float layer 6 kept its own
    qcfg = json.loads((Path(by_kind["gptq"].artifact) / "quantize_config.json").read_text())
    assert qcfg["dynamic"] == report["dynamic"] and any(k.startswith("-:") for k in qcfg["dynamic"])
    for s in session.stages:
        ppl = [m["value"] for m in s.metrics if m["name"] == "perplexity"]
        assert ppl and all(math.isfinite(v) for v in ppl), s.kind
    assert by_kind["eora"].report["layers_with_adapter"] == 7 * 7  # the unquantized layer gets none


def test_mixed_bits_folder_reloads_with_each_module_at_its_bits(mixed_run, tiny_model_dir):
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.quant_linear import dequantized_weight, quantized_linears

    session, _ = mixed_run
    gptq = next(s for s in session.stages if s.kind == "gptq")
    lm = load_model(gptq.artifact, device="cpu")
    mods = quantized_linears(lm.model)
    formats = {(int(m.bits), int(m.group_size)) for m in mods.values()}
    assert formats == {(8, 32), (4, 32), (2, 64)} and len(mods) == 7 * 7
    assert not any(name.startswith("model.layers.6.") for name in mods)
    assert "per layer: 4-bit g32, 8-bit g32, 2-bit g64, some layers unquantized" in lm.notes[0]
    # the unquantized layer is the width stage's 2:4 weights at full precision (not rounded to bf16)
    from frankenlab.pipeline.loading import load_model as load_plain

    pruned = load_plain(str(next(s for s in session.stages if s.kind == "width").artifact), device="cpu")
    a = lm.model.model.layers[6].mlp.down_proj.weight
    assert torch.equal(a, pruned.model.model.layers[6].mlp.down_proj.weight.float())
    # the 8-bit layer dequantizes close to the pruned model's weights; zeros of the 1:8 layer stay zeros
    w0 = dequantized_weight(mods["model.layers.0.self_attn.q_proj"])
    ref0 = pruned.model.model.layers[0].self_attn.q_proj.weight.detach().float()
    assert float((w0 - ref0).norm() / ref0.norm()) < 0.02
    w2 = dequantized_weight(mods["model.layers.2.mlp.up_proj"]).detach()
    assert bool((w2[pruned.model.model.layers[2].mlp.up_proj.weight == 0] == 0).all())
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits
    assert torch.isfinite(logits).all()


def test_mixed_model_bytes_match_the_compact_file_and_the_pure_function(mixed_run, tmp_path, capsys):
    import json
    import math

    from frankenlab.pipeline.compact import load_compact
    from frankenlab.pipeline.footprint import footprint
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.weight_bytes import ModelShape, embedding_weight_bytes, layer_weight_bytes
    from frankenlab.tui.cli.main import main

    session, _ = mixed_run
    folder = next(s for s in session.stages if s.kind == "gptq").artifact
    assert main(["memory", "--model", folder, "--compact", str(tmp_path / "c"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    formats = out["footprints"]["as is"]["formats"]
    assert formats.get("int8 g32") == 14 and formats.get("1:8 int4 g32") == 21 and formats.get("2:4 fp32") == 7
    assert formats.get("int2 g64") == 7
    report = out["compact"]  # the same tolerance as the uniform case (tests/test_quant.py)
    assert abs(report["payload_bytes"] - report["computed_bytes"]) <= 8 * 56 * 4
    lm = load_model(folder, device="cpu")
    fp = footprint(lm.model)
    shape = ModelShape.from_config(lm.model.config.to_dict())
    predicted = [
        layer_weight_bytes(shape, pattern=p, bits=b, group_size=g or 128, dtype="float32")
        for p, b, g in LAYER_CHOICES.values()
    ]
    assert fp.by_layer() == predicted  # every layer, byte for byte
    assert fp.weights_bytes == sum(predicted) + embedding_weight_bytes(shape, dtype="float32")
    assert out["footprints"]["as is"]["layers"] == predicted
    restored = load_compact(tmp_path / "c", dtype="float32")
    from frankenlab.pipeline import quant_cpu

    quant_cpu.set_kernel(lm.model, "exact")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        a, b = restored(input_ids=ids).logits, lm.model(input_ids=ids).logits
    assert math.isfinite(float(a.abs().max())) and torch.allclose(a, b, atol=1e-4)


# -- recipes, sessions, sweeps, compare tables, the form -----------------------------------------------
def _recipe(model_dir, stages: str, evaluation: str = 'after = "none"'):
    from frankenlab.pipeline.recipe import Recipe

    return Recipe.loads(
        f'name = "maps"\nmodel = "{model_dir}"\n[calibration]\nsamples = 8\nseq_len = 32\n'
        f"[evaluation]\n{evaluation}\n{stages}"
    )


MAP_STAGES = """
[[stages]]
kind = "depth"
k = 2
metric = "l1"
[[stages]]
kind = "width"
method = "magnitude"
patterns = { 0-1 = "none", "2-3,5" = "2:4", 4 = "1:8" }
[[stages]]
kind = "gptq"
bits = 4
group_size = 32
layer_bits = { "0-2" = 8, "5" = 16 }
"""


def test_map_fields_round_trip_through_recipe_and_session(tiny_model_dir, data_dir, tmp_path):
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.pipeline.stages import stage_kind
    from frankenlab.sessions import load_session, record_run

    recipe = _recipe(tiny_model_dir, MAP_STAGES)
    w, g = recipe.stages[1].config, recipe.stages[2].config
    assert w.patterns.to_dict() == {"0-1": "none", "2-3": "2:4", "4": "1:8", "5": "2:4"}
    assert g.layer_bits.to_dict() == {"0-2": 8, "5": 16} and g.layer_format(5) is None and g.layer_format(3) == (4, 32)
    again = Recipe.loads(recipe.dumps())  # TOML -> Config -> TOML -> Config
    assert again.to_dict() == recipe.to_dict() and again.stages[1].config == w and again.stages[2].config == g
    # a session records the canonical params, and they rebuild the same configs
    only_width = _recipe(tiny_model_dir, MAP_STAGES.split('[[stages]]\nkind = "gptq"')[0])
    session = record_run(only_width, tmp_path / "run", data_dir=data_dir)
    assert session.status == "done", session.message
    loaded = load_session(tmp_path / "run")
    params = next(s for s in loaded.stages if s.kind == "width").params
    assert params["patterns"] == {"0-1": "none", "2-3": "2:4", "4": "1:8", "5": "2:4"}
    assert from_dict(stage_kind("width").Config, params, "width") == w
    assert next(s for s in loaded.stages if s.kind == "width").report["pattern_holds"] is True


@pytest.mark.parametrize(
    "stages, says",
    [
        ('[[stages]]\nkind = "width"\npatterns = { "6-8" = "2:4" }\n', ["stage 1 (width)", "layer 8", "8 layers"]),
        (
            '[[stages]]\nkind = "depth"\nk = 2\n[[stages]]\nkind = "width"\npatterns = { "6" = "2:4" }\n',
            ["stage 2 (width)", "layer 6", "6 layers", "after any depth stage"],
        ),
        ('[[stages]]\nkind = "gptq"\nlayer_bits = { "9" = 8 }\n', ["stage 1 (gptq)", "layer_bits", "layer 9"]),
        ('[[stages]]\nkind = "gptq"\nlayer_bits = { "0-7" = 16 }\n', ["stage 1 (gptq)", "every layer unquantized"]),
        ('[[stages]]\nkind = "width"\npatterns = { "0" = "1:3" }\n', ["stage 1 (width)", "M=3"]),
    ],
)
def test_out_of_range_layers_refused_before_weights_load(tiny_model_dir, tmp_path, data_dir, monkeypatch, stages, says):
    from frankenlab.pipeline import runner

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the layer maps were checked")

    monkeypatch.setattr("frankenlab.pipeline.runner.load_model", refuse)
    monkeypatch.setattr("frankenlab.pipeline.loading.load_model", refuse)
    result = runner.run_recipe(_recipe(tiny_model_dir, stages), tmp_path / "o", data_dir=data_dir)
    assert result.status == "failed" and "\n" not in result.message
    assert all(s in result.message for s in says), result.message


@pytest.mark.parametrize(
    "data, message",
    [
        ({"layer_bits": {"0": 5}}, r"layer_bits\['0'\]: bits must be one of 2, 3, 4, 8 or 16"),
        ({"layer_group_size": {"0": 48}}, r"layer_group_size\['0'\]: group_size must be -1"),
        ({"layer_bits": {"0-3": 8, "3": 4}}, "both name layer"),
        ({"layer_bits": "0-3=eight"}, "expected a whole number"),
    ],
)
def test_gptq_map_refusals(data, message):
    from frankenlab.pipeline.stages import gptq

    with pytest.raises(RecipeError, match=message) as err:
        from_dict(gptq.Config, data, "gptq")
    assert "\n" not in str(err.value)


def test_gptq_dynamic_and_labels():
    import re

    from frankenlab.pipeline.stages import gptq

    cfg = from_dict(gptq.Config, {"bits": 4, "layer_bits": {"0-1": 8, "6": 16}, "layer_group_size": {"7": 64}}, "g")
    dyn = cfg.dynamic(8)
    assert list(dyn.values()) == [{"bits": 8, "group_size": 128}, {}, {"bits": 4, "group_size": 64}]
    neg = [k for k in dyn if k.startswith("-:")]
    assert len(neg) == 1 and re.match(neg[0][2:], "model.layers.6.mlp.up_proj")
    assert not re.match(neg[0][2:], "model.layers.16.mlp.up_proj")  # 6 is not the start of 16
    assert gptq.describe(to_dict(cfg)) == "GPTQ mixed 8/4-bit g128 (groups per layer) (1 layer 16-bit)"
    assert gptq.describe({"bits": 4, "group_size": 128}) == "GPTQ 4-bit g128"
    assert from_dict(gptq.Config, {"bits": 4}, "g").dynamic(8) is None


def test_compare_tables_label_mixed_stages():
    from frankenlab.sessions.compare import describe_stage

    assert describe_stage("width", {"patterns": {"0-3": "none", "4-7": "2:4"}}) == "Width mixed 2:4 (4 layers)"
    assert describe_stage("gptq", {"bits": 4, "group_size": 32, "layer_bits": {"0": 8}}) == "GPTQ mixed 8/4-bit g32"


def test_sweep_axis_of_maps_has_stable_node_keys(tiny_model_dir):
    from frankenlab.sessions.sweep import build_tree, parse_sweep

    def sweep(maps: str) -> str:
        return f"""
name = "maps"
[base]
model = {{ source = "{tiny_model_dir}", device = "cpu" }}
[base.evaluation]
after = "none"
[[base.stages]]
kind = "width"
pattern = "1:8"
[axes]
"width.patterns" = [{maps}]
"""

    a = parse_sweep(sweep('{ "0-3" = "none", "4-7" = "2:4" }, { "0-7" = "2:4" }')).expand()
    b = parse_sweep(sweep('{ "4-5" = "2:4", "0-3" = "none", "6,7" = "2:4" }, { "7" = "2:4", "0-6" = "2:4" }')).expand()
    assert [c.recipe.stages[0].config.patterns.to_dict() for c in a] == [
        {"0-3": "none", "4-7": "2:4"},
        {"0-7": "2:4"},
    ]
    assert a[0].label == "width.patterns=0-3=none,4-7=2:4" and len({c.slug for c in a}) == 2
    nodes_a, chains_a = build_tree(a)
    nodes_b, chains_b = build_tree(b)
    assert chains_a == chains_b  # the same maps written differently: the same node keys
    assert len(set(chains_a[1]) ^ set(chains_a[2])) == 2  # different maps: different width nodes
    with pytest.raises(Exception, match="layer 9"):
        parse_sweep(sweep('{ "9" = "2:4" }')).expand()


async def test_form_edits_map_fields_as_text_and_a_plan_fills_them(tiny_model_dir):
    from textual.app import App
    from textual.widgets import Input

    from frankenlab.tui.widgets.form_fields import field_text, parse_text
    from frankenlab.tui.widgets.recipe_form import RecipeForm

    info = next(f for f in config_fields(width.Config) if f.name == "patterns")
    assert parse_text(info, "4-7=2:4, 0-3=none") == {"0-3": "none", "4-7": "2:4"}
    assert parse_text(info, "") is None
    with pytest.raises(RecipeError, match="both name layer"):
        parse_text(info, "0-3=none, 2=2:4")
    assert field_text(TextLayerMap.parse({"0-3": "none", "4-7": "2:4"})) == "0-3=none, 4-7=2:4"

    class FormApp(App):
        def compose(self):
            yield RecipeForm(id="form")

    recipe = _recipe(tiny_model_dir, MAP_STAGES)
    app = FormApp()
    async with app.run_test(size=(120, 60)) as pilot:
        form = app.query_one(RecipeForm)
        form.load(recipe)
        await pilot.pause()
        text = app.query_one("#width-patterns", Input)
        assert text.value == "0-1=none, 2-3=2:4, 4=1:8, 5=2:4"
        assert app.query_one("#gptq-layer-bits", Input).value == "0-2=8, 5=16"
        built = form.build()
        assert built.stages[1].config == recipe.stages[1].config and built.stages[2].config == recipe.stages[2].config
        assert form.query_one("#width-ratio").value == "none"  # no default pattern: only the map's layers
        # typing a map: the built recipe follows it; a bad one is refused under the field
        text.value = "0-3=2:4, 4-5=1:8"
        await pilot.pause()
        assert form.build().stages[1].config.patterns.to_dict() == {"0-3": "2:4", "4-5": "1:8"}
        text.value = "0-3=2:4, 3=1:8"
        await pilot.pause()
        with pytest.raises(RecipeError, match="both name layer"):
            form.build()
        # "use this plan": the planner fills the maps (a width stage's pattern None = only the map's layers)
        form.set_stage_fields("width", {"patterns": {"0-5": "2:4"}, "pattern": None})
        form.set_stage_fields("gptq", {"layer_bits": {"0": 8, "1-5": 4}})
        await pilot.pause()
        built = form.build()
        assert built.stages[1].config.patterns.to_dict() == {"0-5": "2:4"} and built.stages[1].config.n is None
        assert built.stages[2].config.layer_bits.to_dict() == {"0": 8, "1-5": 4}
