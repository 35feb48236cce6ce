import pytest
import torch

from pipeline.config import RecipeError, from_dict
from pipeline.context import StageContext
from pipeline.calibration import CalibrationConfig
from pipeline.layerwise import linear_modules
from pipeline.models import decoder_layers
from pipeline.stages import width
from pipeline.stages.width import Config, nm_prune_mask, satisfies_nm, unstructured_prune_mask, wanda_scores


def test_nm_mask_drops_the_n_lowest_of_every_m():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 8.0, 7.0]])
    keep = nm_prune_mask(scores, 2, 4)
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]
    keep18 = nm_prune_mask(scores, 1, 8)
    assert keep18.tolist() == [[True, True, True, True, False, True, True, True]]


def test_unstructured_mask_is_per_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    assert unstructured_prune_mask(scores, 0.5).tolist() == [[False, False, True, True], [True, True, False, False]]


def test_wanda_score_uses_activation_norms():
    w = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    sq = torch.tensor([16.0, 1.0])  # column norms 4 and 1
    assert wanda_scores(w, sq).tolist() == [[4.0, 2.0], [12.0, 1.0]]
    assert wanda_scores(w, None).tolist() == [[1.0, 2.0], [3.0, 1.0]]


def _ctx(tiny, data_dir):
    return StageContext(tiny.tokenizer, tiny.device, CalibrationConfig(samples=8, seq_len=64), data_dir)


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "3:4", "1:8", "6:8", "12:16"])
def test_nm_pattern_exact_after_stage(tiny, data_dir, pattern):
    n, m = map(int, pattern.split(":"))
    result = width.run(tiny.model, _ctx(tiny, data_dir), Config(pattern=pattern))
    for layer in decoder_layers(result.model):
        for name, lin in linear_modules(layer, width.ALL_PROJECTIONS).items():
            w = lin.weight
            groups = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
            assert (groups == n).all(), f"{name}: every group of {m} must hold exactly {n} zeros"
    assert result.report["pattern_holds"]
    assert result.report["targeted_density"] == pytest.approx(1 - n / m)


def test_wanda_differs_from_magnitude_and_respects_targets(tiny, tiny_model_dir, data_dir):
    from pipeline.models import load_model

    other = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    width.run(tiny.model, _ctx(tiny, data_dir), Config(pattern="2:4", targets=("q_proj", "up_proj")))
    width.run(other.model, _ctx(other, data_dir), Config(pattern="2:4", method="magnitude", targets=("q_proj", "up_proj")))
    a = decoder_layers(tiny.model)[3].mlp.up_proj.weight
    b = decoder_layers(other.model)[3].mlp.up_proj.weight
    assert satisfies_nm(a, 2, 4) and satisfies_nm(b, 2, 4)
    assert not torch.equal(a == 0, b == 0), "activation-aware scores should pick other weights than magnitude"
    untouched = decoder_layers(tiny.model)[3].self_attn.k_proj.weight
    assert torch.count_nonzero(untouched) == untouched.numel()


def test_unstructured_ratio(tiny, data_dir):
    result = width.run(tiny.model, _ctx(tiny, data_dir), Config(ratio=0.3))
    assert result.report["targeted_density"] == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("data, message", [
    ({"pattern": "4:4"}, "N must be smaller than M"),
    ({"pattern": "8:4"}, "N must be smaller than M"),
    ({"n": 1, "m": 0}, "M must be a positive integer"),
    ({"n": 1, "m": -4}, "M must be a positive integer"),
    ({"n": 1, "m": "four"}, "expected a whole number"),
    ({"pattern": "2-4"}, "not of the form N:M"),
    ({"pattern": "0:4"}, "N must be at least 1"),
    ({"pattern": "2:4", "ratio": 0.5}, "either an N:M pattern or an unstructured ratio"),
    ({"ratio": 1.5}, "between 0 and 1"),
    ({"pattern": "2:4", "method": "sparsegpt"}, "unknown width method"),
    ({"pattern": "2:4", "targets": ["q_proj", "lm_head"]}, "unknown target"),
    ({"pattern": "2:4", "sparsity": 0.5}, "unknown key"),
    ({}, "needs a pattern"),
])
def test_width_config_errors(data, message):
    with pytest.raises(RecipeError, match=message):
        from_dict(Config, data, "stage 1 (width)")


def test_m_must_divide_the_layer_widths(tiny, data_dir):
    with pytest.raises(RecipeError, match="not a multiple of M=48"):
        width.run(tiny.model, _ctx(tiny, data_dir), Config(pattern="1:48"))
