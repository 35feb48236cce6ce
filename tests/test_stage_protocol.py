"""The stage protocol: a stage kind defined here, in the test, works everywhere with no other file edited.

It loads from TOML, validates with messages, runs in the runner (with its own context and input
artifact), is recorded by the session recorder from events alone, appears in compare tables, and
migrates its params when an old session is loaded.
"""
from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch

from pipeline.config import RecipeError, option, require
from pipeline.context import StageResult
from pipeline.recipe import Recipe
from pipeline.stages import register, stage_kind, unregister


def make_toy_module():
    """A stage kind in a dozen lines: scale every decoder linear weight by `factor`."""
    toy = types.ModuleType("toy_stage")
    toy.__doc__ = "Toy: scale the decoder's linear weights"

    @dataclass(frozen=True)
    class Config:
        factor: float = option(0.5, help="multiply every decoder linear weight by this")
        note: str = option("", form=False, help="free text kept in the report")

        def __post_init__(self):
            require(0 < self.factor <= 1, f"factor must be in (0, 1], got {self.factor}")

    seen_inputs = []

    def run(model, ctx, config):
        seen_inputs.append((ctx.index, ctx.input_artifact, ctx.work_dir))
        with torch.no_grad():
            for layer in model.model.layers:
                for mod in layer.modules():
                    if isinstance(mod, torch.nn.Linear):
                        mod.weight.mul_(config.factor)
        ctx.progress(1.0, "scaled")
        return StageResult(model, {"factor": config.factor, "note": config.note})

    def describe(params):
        return f"Toy x{params.get('factor', 0.5):g}"

    def check_order(kinds_before):
        require("gptq" not in kinds_before, "toy cannot follow gptq")

    def migrate(params, version):
        if "scale" in params:  # an older name of the field
            params["factor"] = params.pop("scale")
        return params

    toy.Config, toy.run, toy.describe, toy.check_order, toy.migrate = Config, run, describe, check_order, migrate
    toy.seen_inputs = seen_inputs
    return toy


@pytest.fixture
def toy():
    module = make_toy_module()
    register("toy", module)
    yield module
    unregister("toy")


def recipe_text(model_dir, stages: str) -> str:
    return f"""
name = "toy-run"
model = "{model_dir}"
[calibration]
samples = 4
seq_len = 32
[evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
{stages}
"""


def test_toy_stage_loads_validates_and_round_trips(toy, tiny_model_dir):
    r = Recipe.loads(recipe_text(tiny_model_dir, '[[stages]]\nkind = "toy"\nfactor = 0.25'))
    assert r.stages[0].kind == "toy" and r.stages[0].config.factor == 0.25
    assert Recipe.loads(r.dumps()).to_dict() == r.to_dict()
    with pytest.raises(RecipeError, match=r"stage 1 \(toy\).*factor must be in \(0, 1\], got 2.0"):
        Recipe.loads(recipe_text(tiny_model_dir, '[[stages]]\nkind = "toy"\nfactor = 2'))
    with pytest.raises(RecipeError, match="unknown key.*colour.*known keys are factor, note"):
        Recipe.loads(recipe_text(tiny_model_dir, '[[stages]]\nkind = "toy"\ncolour = 1'))
    with pytest.raises(RecipeError, match="toy cannot follow gptq"):
        Recipe.loads(recipe_text(tiny_model_dir, '[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "toy"'))
    fields = {f.name: f for f in stage_kind("toy").fields()}
    assert fields["factor"].help.startswith("multiply") and fields["factor"].form and not fields["note"].form
    assert stage_kind("toy").description == "Toy: scale the decoder's linear weights"
    assert stage_kind("toy").layers_after(r.stages[0].config, 8) == 8  # default hook
    r.check_for(8)


def test_toy_stage_runs_is_recorded_and_compared(toy, tiny_model_dir, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    from sessions import compare_table, load_session, record_run
    from sessions.compare import format_table

    stages = '[[stages]]\nkind = "toy"\nfactor = 0.5\nnote = "hi"\n[[stages]]\nkind = "toy"\nfactor = 0.5'
    session = record_run(Recipe.loads(recipe_text(tiny_model_dir, stages)), tmp_path / "run", data_dir=data_dir)
    assert session.status == "done", [s.error for s in session.stages]
    saved = load_session(tmp_path / "run")
    assert [s.kind for s in saved.stages] == ["baseline", "toy", "toy"]
    first, second = saved.stages[1], saved.stages[2]
    assert first.report["note"] == "hi" and first.metric("perplexity") and first.footprint
    # each stage got its own context: its index, its folder, and the model it receives as input
    (i1, in1, wd1), (i2, in2, wd2) = toy.seen_inputs
    assert (i1, i2) == (1, 2) and wd1 != wd2
    assert str(in1) == str(tiny_model_dir) and str(in2) == first.artifact
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(second.artifact)
    w0, w2 = base.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(w2, w0 * 0.25, atol=1e-6)
    table = compare_table([saved])
    text = format_table(table, "md")
    assert "Toy x0.5 + Toy x0.5" in text


def test_toy_params_migrate_from_older_sessions(toy):
    from sessions.record import loads_session
    from tests.test_sessions import full_session

    d = full_session().to_dict()
    d["schema_version"] = 1
    d["recipe"]["stages"] = [{"kind": "toy", "scale": 0.3}]
    d["stages"][1]["kind"] = "toy"
    d["stages"][1]["params"] = {"scale": 0.3}
    s = loads_session(json.dumps(d))
    assert s.recipe["stages"][0] == {"kind": "toy", "factor": 0.3}
    assert s.stages[1].params == {"factor": 0.3}
    assert Recipe.from_dict(s.recipe).stages[0].config.factor == 0.3
