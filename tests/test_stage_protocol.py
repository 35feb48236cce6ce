"""The stage protocol: a stage kind defined here, in the test, works everywhere with no other file edited.

It loads from TOML, validates with messages, runs in the runner (with its own context and input
artifact), is recorded by the session recorder from events alone, appears in compare tables,
migrates its params when an old session is loaded, and is offered and edited by the lab's form
(an input per form field, with its help and the config's own refusals).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch

from frankenlab.evals.config import option, require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.context import StageResult
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.stages import register, stage_kind, unregister


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

    from frankenlab.sessions import compare_table, load_session, record_run
    from frankenlab.sessions.compare import format_table

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
    from frankenlab.sessions.session import loads_session
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


# -- a third-party stage: another distribution registers it with the `frankenlab.stages` entry point --
# The same source is installed as a real wheel into a fresh venv by tests/test_install.py.
PLUGIN_MODULE = "halve_stage"
PLUGIN_SOURCE = '''"""Halve: scale the decoder's linear weights (a stage kind from another distribution)"""

from dataclasses import dataclass

import torch

from frankenlab.evals.config import option, require
from frankenlab.pipeline.context import StageResult


@dataclass(frozen=True)
class Config:
    factor: float = option(0.5, help="multiply every decoder linear weight by this")

    def __post_init__(self):
        require(0 < self.factor <= 1, f"halve: factor must be in (0, 1], got {self.factor}")


def run(model, ctx, config):
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(config.factor)
    ctx.progress(1.0, "halved")
    return StageResult(model, {"factor": config.factor, "plugin": __name__})
'''


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """An installed-looking distribution outside this project (a module and a .dist-info folder with
    entry_points.txt on sys.path): importlib.metadata finds its entry point as it finds a pip-installed one."""
    import sys

    from frankenlab.pipeline import stages

    site = tmp_path / "site"
    info = site / "halve_stage-1.0.dist-info"
    info.mkdir(parents=True)
    (site / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halve-stage\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[frankenlab.stages]\nhalve = {PLUGIN_MODULE}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(stages, "_ENTRY_POINTS_READ", False)  # read the entry points again, as a new process does
    assert "halve" not in stages.STAGES
    yield site
    stages.STAGES.pop("halve", None)
    sys.modules.pop(PLUGIN_MODULE, None)


def test_an_entry_point_stage_from_another_distribution_runs(plugin_distribution, tiny_model_dir, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    from frankenlab.pipeline.stages import stage_names
    from frankenlab.sessions import load_session, record_run

    assert "halve" in stage_names()
    kind = stage_kind("halve")
    assert kind.target == PLUGIN_MODULE  # registered by the entry point (a module path), not by register()
    assert kind.description == "Halve: scale the decoder's linear weights (a stage kind from another distribution)"
    assert kind.load().__file__ == str(plugin_distribution / f"{PLUGIN_MODULE}.py")  # outside this project
    with pytest.raises(RecipeError, match=r"stage 1 \(halve\).*factor must be in \(0, 1\], got 3.0"):
        Recipe.loads(recipe_text(tiny_model_dir, '[[stages]]\nkind = "halve"\nfactor = 3'))

    recipe = Recipe.loads(recipe_text(tiny_model_dir, '[[stages]]\nkind = "halve"'))
    session = record_run(recipe, tmp_path / "run", data_dir=data_dir)
    assert session.status == "done", [s.error for s in session.stages]
    saved = load_session(tmp_path / "run")
    assert [s.kind for s in saved.stages] == ["baseline", "halve"]
    halved = saved.stages[1]
    assert halved.report["plugin"] == PLUGIN_MODULE and halved.metric("perplexity")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(halved.artifact)
    w0, w1 = base.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(w1, w0 * 0.5, atol=1e-6)


# -- the lab's form: built from the registry and the config metadata alone -------------------------
@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


async def test_toy_stage_in_the_lab_form(toy, loaded, tmp_path, data_dir):
    from textual.widgets import Button, Input, Select

    from tests.test_tui import make_app, wait_for

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("2")
        form = app.query_one("#form")
        assert form.kinds["toy"] == "Toy: scale the decoder's linear weights"
        form.query_one("#add-kind", Select).value = "toy"  # refused if the picker did not offer it
        await pilot.pause()
        assert "Toy: scale the decoder's linear weights" in str(form.query_one("#add-hint").render())
        form.query_one("#add-stage", Button).press()
        await wait_for(pilot, lambda: form.query("#toy-factor"), timeout=10)
        field = form.query_one("#toy-factor-field")
        factor = field.query_one("#toy-factor", Input)
        assert "multiply every decoder linear weight by this" in str(field.query_one(".field-help").render())
        assert factor.tooltip == "multiply every decoder linear weight by this"
        await wait_for(pilot, lambda: app.focused is factor, timeout=10)  # a new stage takes the cursor
        await wait_for(pilot, lambda: field.query_one(".field-help").display, timeout=10)  # help shows while focused
        assert not form.query("#toy-note") and not form.query("#toy-note-field")  # form=False: not shown
        assert factor.value == "0.5"

        factor.value = "2"
        await wait_for(pilot, lambda: field.has_class("invalid"), timeout=10)
        assert "factor must be in (0, 1], got 2.0" in str(field.query_one(".field-error").render())
        with pytest.raises(RecipeError, match=r"stage 1 \(toy\): factor must be in \(0, 1\], got 2.0"):
            form.build()
        factor.value = "abc"
        await wait_for(pilot, lambda: "expected a number" in str(field.query_one(".field-error").render()), timeout=10)
        factor.value = "0.25"
        await wait_for(pilot, lambda: not field.has_class("invalid"), timeout=10)
        built = form.build()
        assert [s.kind for s in built.stages] == ["toy"] and built.stages[0].config.factor == 0.25

        # a recipe's form=False field survives a load and build
        form.load(Recipe.loads(recipe_text("models/x", '[[stages]]\nkind = "toy"\nfactor = 0.75\nnote = "x"')))
        await pilot.pause()
        again = form.build().stages
        assert [(s.kind, s.config.factor, s.config.note) for s in again] == [("toy", 0.75, "x")]


async def test_form_stage_order_and_repeats(toy, loaded, tmp_path, data_dir):
    """Order is data: a recipe's stages come back in order, a kind may repeat, moves and removals show in
    build(), and an order rule (the kind's check_order) is shown on the stage and refused by build()."""
    from textual.widgets import Button

    from frankenlab.pipeline.recipe import StageSpec
    from frankenlab.pipeline.stages import depth, width
    from frankenlab.tui.widgets.stage_editor import StageEditor
    from tests.test_tui import make_app, wait_for

    recipe = Recipe(
        name="order",
        stages=[
            StageSpec("width", width.Config(pattern="2:4")),
            StageSpec("depth", depth.Config(k=1, metric="l1", protected_first=1, protected_last=1)),
            StageSpec("width", width.Config(pattern="1:8", method="magnitude"), name="second width"),
        ],
    )

    def shape(r):
        return [(s.kind, s.name, s.params()) for s in r.stages]

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("2")
        form = app.query_one("#form")
        assert form.load(recipe) == []
        await pilot.pause()
        assert shape(form.build()) == shape(recipe)
        assert [e.border_title for e in form.editors] == ["1 width", "2 depth", "3 width · second width"]

        third = form.editors[2]  # move the second width stage up, from the keyboard
        await wait_for(pilot, lambda: third.query("#width-method"), timeout=10)
        third.query_one("#width-method").focus()
        await pilot.press("ctrl+up")
        assert [e.kind for e in form.editors] == ["width", "width", "depth"]
        built = form.build()
        assert [(s.kind, s.name) for s in built.stages] == [("width", ""), ("width", "second width"), ("depth", "")]
        second = built.stages[1].config
        assert (second.n, second.m, second.method) == (1, 8, "magnitude")
        await pilot.pause()
        assert [e.id for e in form.query(StageEditor)] == [e.id for e in form.editors]  # the screen follows

        form.editors[0].query_one("#stage-remove", Button).press()  # remove the first one with its button
        await wait_for(pilot, lambda: len(form.editors) == 2, timeout=10)
        assert [(s.kind, s.name) for s in form.build().stages] == [("width", "second width"), ("depth", "")]
        assert form.editors[0].border_title == "1 width · second width"

        # an order rule of the kind itself: shown on the stage, refused by build(), gone once moved
        toy.check_order = lambda before: require("width" not in before, "toy must come before any width stage")
        added = form.add_stage("toy")
        await wait_for(
            pilot,
            lambda: (
                added.query(".stage-problem")
                and "toy must come before any width" in str(added.query_one(".stage-problem").render())
            ),
            timeout=10,
        )
        with pytest.raises(RecipeError, match=r"stage 3 \(toy\): toy must come before any width stage"):
            form.build()
        assert form.move_stage(added, -2)
        await wait_for(pilot, lambda: not added.query_one(".stage-problem").display, timeout=10)
        assert [s.kind for s in form.build().stages] == ["toy", "width", "depth"]
        await wait_for(pilot, lambda: added.query("#toy-factor"), timeout=10)
        added.query_one("#toy-factor").focus()
        await pilot.press("ctrl+delete")  # remove the stage the cursor is in
        assert [e.kind for e in form.editors] == ["width", "depth"]


async def test_bundled_recipes_round_trip_through_the_form(loaded, tmp_path, data_dir):
    from frankenlab.pipeline.recipe import bundled_recipes
    from tests.test_tui import make_app

    app = make_app(loaded, tmp_path, data_dir)
    async with app.run_test(size=(100, 40)) as pilot:
        form = app.query_one("#form")
        for name in bundled_recipes():
            recipe = Recipe.load(name)
            assert form.load(recipe) == [], name
            await pilot.pause()
            form.model_source = recipe.model.source  # the lab names its own model in what it builds
            assert form.build().to_dict() == recipe.to_dict(), name
