import pytest

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.recipe import Recipe, bundled_recipes

FULL = """
name = "t"
description = "round trip"
[model]
source = "default"
dtype = "float32"
[calibration]
dataset = "c4"
samples = 16
seq_len = 64
seed = 3
[evaluation]
perplexity = ["wikitext2-rows-512", "wikitext2-concat-256"]
ppl_limit = 8
[[stages]]
kind = "depth"
k = 2
metric = "taylor"
protected_first = 3
[[stages]]
kind = "width"
pattern = "1:8"
"""


def test_round_trip_load_dump_load_equal(tmp_path):
    r = Recipe.loads(FULL)
    again = Recipe.loads(r.dumps())
    assert again == r
    r.save(tmp_path / "r.toml")
    assert Recipe.load(tmp_path / "r.toml") == r
    assert r.stages[1].config.n == 1 and r.stages[1].config.m == 8
    assert r.stages[0].config.protected_first == 3


@pytest.mark.parametrize("name", bundled_recipes())
def test_bundled_recipes_load_and_fit_the_default_model(name):
    r = Recipe.load(name)
    r.check_for(30)
    assert r.stages
    assert Recipe.loads(r.dumps()) == r


def test_bundled_headline_recipes_exist():
    assert {"depth2", "width1of8", "width2of4", "depth2-width1of8"} <= set(bundled_recipes())


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[stages]]\nkind = "width"\npattern = "4:4"', "N must be smaller than M"),
        ('[[stages]]\nkind = "width"\nn = 1\nm = 0', "M must be a positive integer"),
        ('[[stages]]\nkind = "width"\nn = 1\nm = 2.5', "expected a whole number"),
        ('[[stages]]\nkind = "prune"', "unknown stage kind 'prune'"),
        ('[[stages]]\nkind = "depth"\nmetric = "cosine"', "unknown importance metric 'cosine'"),
        ('[[stages]]\nkind = "depth"\nk = "two"', "expected a whole number"),
        ("[[stages]]\nk = 2", "every stage needs a kind"),
        ('colour = "red"', "unknown key"),
        ('[evaluation]\nperplexity = ["wikitext2-windows"]', "unknown perplexity protocol"),
        ("[calibration]\nsamples = 0", "calibration.samples must be at least 1"),
        ('name = "x"\n[[stages]\n', "not valid TOML"),
    ],
)
def test_validation_messages(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.loads(text)


def test_removing_more_layers_than_unprotected_is_refused():
    r = Recipe.loads('[[stages]]\nkind = "depth"\nk = 29')
    with pytest.raises(RecipeError, match="cannot remove 29 of 30 layers: 6 are protected"):
        r.check_for(30)
    # two depth stages share the budget
    r = Recipe.loads('[[stages]]\nkind = "depth"\nk = 22\n[[stages]]\nkind = "depth"\nk = 3')
    with pytest.raises(RecipeError, match="stage 2 .depth.: cannot remove 3 of 8 layers"):
        r.check_for(30)


def test_missing_recipe_file_names_bundled():
    with pytest.raises(RecipeError, match="does not exist .bundled recipes: depth2"):
        Recipe.load("no-such-recipe.toml")
