import pytest
import torch

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.calibration import CalibrationConfig
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.stages import depth
from frankenlab.pipeline.stages.depth import Config


def _ctx(tiny, data_dir):
    return StageContext(tiny.tokenizer, tiny.device, CalibrationConfig(samples=8, seq_len=64), data_dir)


def _neuter(model, i):
    """Make layer i an identity: its attention and MLP outputs become zero."""
    layer = decoder_layers(model)[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("metric", ["l1", "taylor"])
def test_identity_layer_ranks_least_important(tiny, data_dir, metric):
    _neuter(tiny.model, 5)
    cfg = Config(k=1, metric=metric, protected_first=2, protected_last=1)
    scores = depth.importance(tiny.model, _ctx(tiny, data_dir), cfg)
    assert sorted(scores) == [2, 3, 4, 5, 6], "protected layers are not scored"
    assert min(scores, key=scores.get) == 5
    result = depth.run(tiny.model, _ctx(tiny, data_dir), cfg)
    assert result.report["removed"] == [5]
    assert result.model.config.num_hidden_layers == 7


def test_perplexity_metric_scores_and_removes_the_cheapest_layers(tiny, data_dir):
    from frankenlab.evals.perplexity import perplexity_of_ids

    _neuter(tiny.model, 5)
    ctx = _ctx(tiny, data_dir)
    cfg = Config(k=2, metric="perplexity", protected_first=2, protected_last=1)
    scores = depth.importance(tiny.model, ctx, cfg)
    # removing an identity layer leaves perplexity exactly at the baseline
    baseline = perplexity_of_ids(tiny.model, [ctx.calibration_ids()[: cfg.samples]])
    assert scores[5] == pytest.approx(baseline, rel=1e-5)
    result = depth.run(tiny.model, ctx, cfg)
    assert result.report["removed"] == sorted(sorted(scores, key=scores.get)[:2])
    assert result.model.config.num_hidden_layers == 6
    assert set(result.report["scores"]) == {"2", "3", "4", "5", "6"}


def test_perplexity_metric_equals_plain_perplexity_without_the_layer(tiny, data_dir):
    from frankenlab.evals.perplexity import perplexity_of_ids
    from frankenlab.pipeline.plans import LayerPlan, planned

    ctx = _ctx(tiny, data_dir)
    ids = ctx.calibration_ids()[:4]
    scores = depth.perplexity_scores(tiny.model, ids, [3, 4], ctx)
    for i in (3, 4):
        with planned(tiny.model, LayerPlan.without(8, [i])):
            assert scores[i] == pytest.approx(perplexity_of_ids(tiny.model, [ids]), rel=1e-4)


def test_removing_protected_or_too_many_layers_is_refused():
    with pytest.raises(RecipeError, match="cannot remove 3 of 8 layers: 6 are protected"):
        Config(k=3).check_for(8)
    with pytest.raises(RecipeError, match=r"cannot remove layers \[0\]: they are protected"):
        Config(layers=(0, 5)).check_for(8)
    with pytest.raises(RecipeError, match="unknown importance metric"):
        Config(metric="cosine")
    Config(k=2).check_for(8)


def test_explicit_plan_with_repeat(tiny, data_dir):
    result = depth.run(tiny.model, _ctx(tiny, data_dir), Config(plan="0-3,3,5-7"))
    assert result.report["removed"] == [4] and result.report["repeated"] == [3]
    assert len(decoder_layers(result.model)) == 8
