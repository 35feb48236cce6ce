import pytest
import torch

from frankenlab.evals.config import from_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.calibration import CalibrationConfig
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.layerwise import linear_modules
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.stages import width
from frankenlab.pipeline.stages.width import Config, nm_prune_mask, satisfies_nm, unstructured_prune_mask, wanda_scores


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
    w = decoder_layers(result.model)[0].self_attn.q_proj.weight
    assert not w.is_inference() and w.requires_grad, "pruned weights must stay trainable (LoRA comes next)"


def test_wanda_differs_from_magnitude_and_respects_targets(tiny, tiny_model_dir, data_dir):
    from frankenlab.pipeline.loading import load_model

    other = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    width.run(tiny.model, _ctx(tiny, data_dir), Config(pattern="2:4", targets=("q_proj", "up_proj")))
    width.run(
        other.model, _ctx(other, data_dir), Config(pattern="2:4", method="magnitude", targets=("q_proj", "up_proj"))
    )
    a = decoder_layers(tiny.model)[3].mlp.up_proj.weight
    b = decoder_layers(other.model)[3].mlp.up_proj.weight
    assert satisfies_nm(a, 2, 4) and satisfies_nm(b, 2, 4)
    assert not torch.equal(a == 0, b == 0), "activation-aware scores should pick other weights than magnitude"
    untouched = decoder_layers(tiny.model)[3].self_attn.k_proj.weight
    assert torch.count_nonzero(untouched) == untouched.numel()


def test_unstructured_ratio(tiny, data_dir):
    result = width.run(tiny.model, _ctx(tiny, data_dir), Config(ratio=0.3))
    assert result.report["targeted_density"] == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize(
    "data, message",
    [
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
    ],
)
def test_width_config_errors(data, message):
    with pytest.raises(RecipeError, match=message):
        from_dict(Config, data, "stage 1 (width)")


def test_m_must_divide_the_layer_widths(tiny, data_dir):
    with pytest.raises(RecipeError, match="not a multiple of M=48"):
        width.run(tiny.model, _ctx(tiny, data_dir), Config(pattern="1:48"))


def _reference_wanda(model, ids, n, m):
    """WANDA as in the paper's code: per layer, a full forward with hooks, prune, a second forward."""
    from frankenlab.pipeline.layerwise import capture_inputs, run_layer

    inputs = capture_inputs(model, ids, batch_size=4)
    for layer in decoder_layers(model):
        linears = linear_modules(layer, width.ALL_PROJECTIONS)
        sums = {name: torch.zeros(lin.in_features) for name, lin in linears.items()}

        def hook(_mod, args, _out, name, sums=sums):
            sums[name] += args[0].float().pow(2).sum(dim=(0, 1))

        handles = [lin.register_forward_hook(lambda *a, name=name: hook(*a, name)) for name, lin in linears.items()]
        run_layer(layer, inputs)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, lin in linears.items():
                lin.weight.mul_(nm_prune_mask(lin.weight.abs() * sums[name].sqrt(), n, m))
        inputs = run_layer(layer, inputs)


def test_stage_matches_the_reference_two_pass_wanda(tiny, tiny_model_dir, data_dir):
    from frankenlab.pipeline.loading import load_model

    ctx = _ctx(tiny, data_dir)
    reference = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    _reference_wanda(reference.model, ctx.calibration_ids(), 2, 4)
    width.run(tiny.model, ctx, Config(pattern="2:4", batch_size=4, sequential="layer"))
    for ours, ref in zip(decoder_layers(tiny.model), decoder_layers(reference.model), strict=False):
        for (name, a), b in zip(
            linear_modules(ours, width.ALL_PROJECTIONS).items(),
            linear_modules(ref, width.ALL_PROJECTIONS).values(),
            strict=False,
        ):
            assert torch.equal(a.weight == 0, b.weight == 0), f"{name}: mask differs from reference WANDA"


def test_input_statistics_stop_before_the_work_they_do_not_need(tiny, data_dir):
    from frankenlab.pipeline.layerwise import capture_inputs, input_square_sums

    layer = decoder_layers(tiny.model)[2]
    inputs = capture_inputs(tiny.model, _ctx(tiny, data_dir).calibration_ids(), batch_size=4)
    calls = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        sums = input_square_sums(layer, linear_modules(layer, width.ALL_PROJECTIONS), inputs)
        assert not calls, "the statistics pass should stop at the down projection's input"
        only_q = input_square_sums(layer, linear_modules(layer, ("q_proj",)), inputs)
    finally:
        handle.remove()
    assert set(sums) == {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert torch.equal(sums["self_attn.q_proj"], sums["self_attn.v_proj"])
    assert torch.equal(only_q["self_attn.q_proj"], sums["self_attn.q_proj"])
    assert all(bool((s > 0).all()) for s in sums.values())


def test_true_sequential_scores_each_projection_on_the_inputs_it_receives(tiny, tiny_model_dir, data_dir):
    from frankenlab.pipeline.loading import load_model

    ctx = _ctx(tiny, data_dir)
    reference = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    width.run(reference.model, ctx, Config(pattern="2:4", sequential="layer"))
    result = width.run(tiny.model, ctx, Config(pattern="2:4"))  # projection is the default
    assert result.report["pattern_holds"] and "true-sequential" in result.report["statistics"]
    ours, ref = decoder_layers(tiny.model)[0], decoder_layers(reference.model)[0]
    for proj in ("q_proj", "k_proj", "v_proj"):  # first in the layer: the same inputs either way
        assert torch.equal(getattr(ours.self_attn, proj).weight == 0, getattr(ref.self_attn, proj).weight == 0)
    # later projections see the outputs of the pruned ones before them, so some choices differ
    assert not torch.equal(ours.mlp.down_proj.weight == 0, ref.mlp.down_proj.weight == 0)


def test_one_pass_output_is_the_edited_layers_output(tiny, data_dir):
    from frankenlab.pipeline.layerwise import capture_inputs, edit_as_it_runs, run_layer

    layer = decoder_layers(tiny.model)[1]
    ids = _ctx(tiny, data_dir).calibration_ids()
    x = capture_inputs(tiny.model, ids, batch_size=ids.shape[0])[0]
    order = []

    def edit(name, lin, sq_sum):
        order.append(name)
        with torch.no_grad():
            lin.weight.mul_(nm_prune_mask(wanda_scores(lin.weight, sq_sum), 1, 4))

    out = edit_as_it_runs(layer, linear_modules(layer, width.ALL_PROJECTIONS), x, edit)
    assert [n.split(".")[-1] for n in order] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert torch.allclose(out.hidden, run_layer(layer, [x])[0].hidden, atol=1e-6)


def test_one_batch_out_of_memory_says_what_to_change(tiny, data_dir, monkeypatch):
    def no_memory(*_a, **_k):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 81604378624 bytes"
        )

    monkeypatch.setattr(width, "edit_as_it_runs", no_memory)
    with pytest.raises(RecipeError, match="sequential = 'layer' with a smaller batch_size"):
        width.run(tiny.model, _ctx(tiny, data_dir), Config(pattern="2:4"))
