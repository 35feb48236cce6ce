import copy
import gc
import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from frankenlab.pipeline import sharing
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.plans import LayerPlan, PlanError, apply_plan, greedy_tokens, materialize, planned
from frankenlab.pipeline.sharing import model_lock

PLANS = [
    "0-7",  # identity
    "0-2,4-7",  # one skip
    "1-7",  # skip layer 0
    "0-3,3,3,4-7",  # a repeat
    "1,1,2,5,5,7",  # skips and repeats, layer 0 skipped
    "7,6,5,4,3,2,1,0",  # reversed
]


def _prompt(tok):
    return tok("Question: Who wrote Hamlet? Answer:", return_tensors="pt").input_ids


@pytest.mark.parametrize("spec", PLANS)
def test_cached_generation_matches_uncached(tiny, spec):
    plan = LayerPlan.parse(spec, 8)
    ids = _prompt(tiny.tokenizer)
    with planned(tiny.model, plan):
        cached = greedy_tokens(tiny.model, ids, 12, use_cache=True)
        uncached = greedy_tokens(tiny.model, ids, 12, use_cache=False)
    assert cached == uncached
    assert len(cached) == 12


def test_plan_changes_output_and_restores(tiny):
    ids = _prompt(tiny.tokenizer)
    with torch.inference_mode():
        base = tiny.model(ids).logits
        with planned(tiny.model, LayerPlan.parse("0-2,4-7", 8)):
            skipped = tiny.model(ids).logits
        again = tiny.model(ids).logits
    assert not torch.allclose(base, skipped)
    torch.testing.assert_close(base, again)
    assert len(decoder_layers(tiny.model)) == 8 and tiny.model.config.num_hidden_layers == 8


def test_repeat_is_not_a_weight_copy(tiny):
    plan = LayerPlan.parse("0,0,1-7", 8)
    before = sum(p.numel() for p in tiny.model.parameters())
    restore = apply_plan(tiny.model, plan)
    try:
        layers = decoder_layers(tiny.model)
        assert layers[0].layer is layers[1].layer
        assert sum(p.numel() for p in tiny.model.parameters()) == before
    finally:
        restore()


def test_runtime_plan_equals_materialized(tiny, tiny_model_dir, tmp_path):
    plan = LayerPlan.parse("0,1,3,4,6,7", 8)
    ids = _prompt(tiny.tokenizer)
    with torch.inference_mode(), planned(tiny.model, plan):
        expected = tiny.model(ids).logits
    materialize(tiny.model, plan)
    assert tiny.model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in decoder_layers(tiny.model)] == list(range(6))
    tiny.model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.num_hidden_layers == 6
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
    # cached generation on the reloaded, renumbered model works (IndexError if not renumbered)
    assert greedy_tokens(reloaded, ids, 8, use_cache=True) == greedy_tokens(reloaded, ids, 8, use_cache=False)


def test_materialize_with_repeats_copies(tiny):
    plan = LayerPlan.parse("0-3,3,4-7", 8)
    ids = _prompt(tiny.tokenizer)
    with torch.inference_mode(), planned(tiny.model, plan):
        expected = tiny.model(ids).logits
    materialize(tiny.model, plan)
    layers = decoder_layers(tiny.model)
    assert len(layers) == 9 and layers[3] is not layers[4]
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model(ids).logits, expected)


def test_plan_text_round_trip_and_errors():
    plan = LayerPlan.parse("0-3, 5,5,6-29", 30)
    assert plan.to_text() == "0-3,5,5-29"
    assert LayerPlan.parse(plan.to_text(), 30) == plan
    assert plan.skipped == [4] and plan.repeated == [5]
    assert LayerPlan.from_counts(plan.counts()) == plan
    with pytest.raises(PlanError, match="out of range"):
        LayerPlan.parse("0-30", 30)
    with pytest.raises(PlanError, match="at least one"):
        LayerPlan.parse("", 30)
    with pytest.raises(PlanError, match="cannot read"):
        LayerPlan.parse("0-3,x", 30)


def _free_for_others(model) -> bool:
    """Whether another thread could take the model's lock right now (it does not wait for it)."""
    result = []

    def probe():
        lock = model_lock(model)
        result.append(lock.acquire(blocking=False))
        if result[0]:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return result[0]


@pytest.mark.parametrize("spec", ["0-2,4-7", "0-7"])
def test_planned_holds_the_model_lock_and_it_is_reentrant(tiny, spec):
    assert _free_for_others(tiny.model)
    with planned(tiny.model, LayerPlan.parse(spec, 8)):  # the identity plan holds it too
        assert not _free_for_others(tiny.model)
        with model_lock(tiny.model), planned(tiny.model, None):  # a holder may take it again
            assert not _free_for_others(tiny.model)
        assert not _free_for_others(tiny.model)
    assert _free_for_others(tiny.model)


def test_model_locks_are_per_object_and_go_with_the_model():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)
    held = len(sharing._LOCKS)
    del a
    gc.collect()
    assert len(sharing._LOCKS) == held - 1  # no lock kept for a model that is gone
    c = copy.deepcopy(b)  # the lock is not an attribute of the model: a copy works and gets its own
    assert model_lock(c) is not model_lock(b)
