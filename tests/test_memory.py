"""Memory accounting: bytes of hand-built tensors in every format, tied storage, KV cache, targets, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import footprint as footprint_module
from frankenlab.pipeline.footprint import (
    Assume,
    Storage,
    detect_storage,
    footprint,
    footprint_summary,
    quantized_storage,
)
from frankenlab.pipeline.quant_linear import (
    dequantized_weight,
    g_idx_trivial,
    group_index,
    group_size,
    is_quantized_linear,
    quant_codes,
    quantized_linears,
)
from frankenlab.pipeline.stages.width import nm_prune_mask
from frankenlab.pipeline.targets import Target, load_targets, parse_size, parse_targets
from frankenlab.pipeline.tensor_formats import nm_index_bits


# -- a stand-in for a gptqmodel quantized linear (same buffers, same packing) -----------------------
def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, cols) codes -> (n * bits / 32, cols) int32 words, lowest bits first (gptqmodel's layout)."""
    per = 32 // bits
    c = codes.long().reshape(-1, per, codes.shape[1])
    words = sum(c[:, j] << (bits * j) for j in range(per))
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


class FakeQuantLinear(nn.Module):
    """Asymmetric per-group quantization with gptqmodel's qweight/qzeros/scales/g_idx buffers."""

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int = 4,
        group: int = 128,
        g_idx: torch.Tensor | None = None,
        keep_zeros: bool = True,
    ):
        super().__init__()
        out_f, in_f = weight.shape
        self.bits, self.group_size, self.in_features, self.out_features = bits, group, in_f, out_f
        maxq = 2**bits - 1
        g_idx = torch.arange(in_f) // group if g_idx is None else g_idx
        groups = int(g_idx.max()) + 1
        w = weight.float()
        lo = torch.stack([w[:, g_idx == g].min(1).values.clamp(max=0) for g in range(groups)])  # (G, out)
        hi = torch.stack([w[:, g_idx == g].max(1).values.clamp(min=0) for g in range(groups)])
        scales = ((hi - lo) / maxq).clamp(min=1e-6).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, maxq)
        codes = torch.clamp(torch.round(w / scales.float()[g_idx].T) + zeros[g_idx].T, 0, maxq)  # (out, in)
        if keep_zeros:  # an exact zero stays exactly representable (code == zero point)
            codes = torch.where(w == 0, zeros[g_idx].T, codes)
        self.register_buffer("qweight", _pack_rows(codes.T.contiguous(), bits))
        self.register_buffer("qzeros", _pack_rows(zeros.T.contiguous(), bits).T.contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx.to(torch.int32))
        self.bias = None

    def dequantized(self) -> torch.Tensor:
        codes, zeros = quant_codes(self)
        g = self.g_idx.long()
        return self.scales.float()[g].T * (codes.float() - zeros.float()[g].T)

    def dequantize_weight(self) -> torch.Tensor:  # gptqmodel's orientation: (in, out)
        return self.dequantized().T

    def forward(self, x):
        return x @ self.dequantized().to(x.dtype).T


def quantize_decoder(model: nn.Module, bits: int = 4, group: int = 32) -> nn.Module:
    from frankenlab.pipeline.layerwise import linear_modules
    from frankenlab.pipeline.loading import decoder_layers
    from frankenlab.pipeline.stages.width import ALL_PROJECTIONS

    for layer in decoder_layers(model):
        for name, lin in linear_modules(layer, ALL_PROJECTIONS).items():
            layer.set_submodule(name, FakeQuantLinear(lin.weight.detach(), bits, group))
    return model


def prune_nm(model: nn.Module, n: int, m: int) -> nn.Module:
    from frankenlab.pipeline.layerwise import linear_modules
    from frankenlab.pipeline.loading import decoder_layers
    from frankenlab.pipeline.stages.width import ALL_PROJECTIONS

    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in linear_modules(layer, ALL_PROJECTIONS).values():
                lin.weight.mul_(nm_prune_mask(lin.weight.abs(), n, m))
    return model


def nm_matrix(rows: int, cols: int, n: int, m: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return w * nm_prune_mask(w.float().abs(), n, m).to(dtype)


# -- storage arithmetic against hand-computed bytes ------------------------------------------------
def test_index_bits_per_group():
    assert nm_index_bits(2, 4) == 4  # 2 kept x 2 bits: NVIDIA's 2:4 metadata
    assert nm_index_bits(1, 8) == 3  # the one pruned position
    assert nm_index_bits(4, 8) == 8  # 4 x 3 bits > 8-bit mask
    assert nm_index_bits(12, 16) == 16  # 4 kept x 4 bits == 16-bit mask
    assert nm_index_bits(1, 2) == 1


@pytest.mark.parametrize(
    "storage, expected",
    [
        (Storage((64, 128), "float32"), 64 * 128 * 4),
        (Storage((64, 128), "bfloat16"), 64 * 128 * 2),
        # 2:4 fp32: half the values + 2 bits per kept value (4 bits per group of 4)
        (Storage((64, 128), "float32", nm=(2, 4)), 64 * 64 * 4 + 64 * 32 * 4 // 8),
        # 2:4 fp16: 8192 x 2 bytes + 2048 groups x 4 bits
        (Storage((128, 128), "float16", nm=(2, 4)), 128 * 64 * 2 + 128 * 32 // 2),
        # 1:8 bf16: 7 of 8 values kept + 3 bits per group
        (Storage((16, 64), "bfloat16", nm=(1, 8)), 16 * 56 * 2 + 16 * 8 * 3 // 8),
        # int4 g128: 4 bits per weight + per (group, output) one fp16 scale and one 4-bit zero
        (Storage((64, 256), "float16", quant=(4, 128)), 64 * 256 // 2 + 2 * 64 * 2 + 2 * 64 // 2),
        # 2:4 + int4 g128: kept codes only, index bits, same scales and zeros
        (Storage((64, 256), "float16", nm=(2, 4), quant=(4, 128)), 64 * 128 // 2 + 64 * 64 // 2 + 2 * 64 * 2 + 64),
        # unstructured: nonzeros + 1-bit mask
        (Storage((10, 80), "float32", nnz=400), 400 * 4 + 100),
        # int4 with a bias and a non-trivial g_idx
        (Storage((8, 32), "float16", quant=(4, 32), extra_bytes=8 * 2 + 32 * 4), 8 * 32 // 2 + 8 * 2 + 4 + 16 + 128),
    ],
)
def test_storage_bytes(storage, expected):
    assert storage.bytes == expected


def test_detect_formats_of_hand_built_tensors():
    assert detect_storage(torch.randn(32, 64)).label == "fp32"
    s = detect_storage(nm_matrix(32, 64, 2, 4))
    assert (s.nm, s.label, s.bytes) == ((2, 4), "2:4 fp32", 32 * 32 * 4 + 32 * 16 // 2)
    assert detect_storage(nm_matrix(32, 64, 1, 8, torch.bfloat16)).nm == (1, 8)
    assert detect_storage(nm_matrix(32, 64, 12, 16)).nm == (12, 16)
    assert detect_storage(nm_matrix(32, 64, 1, 2)).nm == (1, 2)  # cheaper than calling it 2:4
    # a dense matrix with a few stray zeros (dequantized GGUF weights have some) stays dense
    w = torch.randn(32, 64)
    w[0, :5] = 0
    assert detect_storage(w).label == "fp32"
    # unstructured 50 %: values + bitmask
    w = torch.randn(40, 80)
    w[torch.rand(40, 80, generator=torch.Generator().manual_seed(1)) < 0.5] = 0
    w[:, :4] = 1.0  # some groups fully dense: no N:M pattern
    s = detect_storage(w)
    assert s.nm is None and s.nnz == int((w != 0).sum()) and s.bytes == s.nnz * 4 + 40 * 80 // 8
    assert detect_storage(torch.ones(7)).label == "fp32"  # vectors are dense


def test_quantized_linear_counted_from_its_buffers():
    w = torch.randn(64, 256)
    q = FakeQuantLinear(w, bits=4, group=128)
    storage, buffers = quantized_storage(q)
    assert storage.quant == (4, 128) and storage.nm is None
    assert buffers == q.qweight.nbytes + q.qzeros.nbytes + q.scales.nbytes  # trivial g_idx not counted
    assert storage.bytes == buffers == 64 * 256 // 2 + 2 * 64 * 2 + 2 * 64 // 2
    # act-order: a permuted g_idx must be stored
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0)) // 128
    storage, buffers = quantized_storage(FakeQuantLinear(w, 4, 128, g_idx=perm))
    assert storage.extra_bytes == 256 * 4 and buffers == storage.bytes
    # a 2:4-pruned matrix quantized with its zeros kept: only the kept codes + index bits count
    storage, _ = quantized_storage(FakeQuantLinear(nm_matrix(64, 256, 2, 4), 4, 128))
    assert storage.label == "2:4 int4 g128" and storage.bytes == 64 * 128 // 2 + 64 * 64 // 2 + 2 * 64 * 2 + 64
    # zeros without a pattern (GPTQ without a mask keeps most, not all): kept codes + a 1-bit mask
    w = nm_matrix(64, 256, 2, 4)
    w[:, :8] = 1.0  # a few groups lost their zeros
    storage, _ = quantized_storage(FakeQuantLinear(w, 4, 128))
    assert storage.nm is None and storage.label.startswith("sparse") and storage.label.endswith("int4 g128")
    assert storage.bytes == -(-storage.nnz // 2) + 64 * 256 // 8 + 2 * 64 * 2 + 64


def test_quantized_linear_facts(tiny):
    model = quantize_decoder(tiny.model, 4, 32)
    found = quantized_linears(model)
    assert len(found) == 8 * 7 and not is_quantized_linear(model.model.layers[0].input_layernorm)
    q, down = found["model.layers.0.self_attn.q_proj"], found["model.layers.0.mlp.down_proj"]  # 64x64, 64x160
    assert group_size(down) == 32 and g_idx_trivial(down)
    assert torch.equal(group_index(down), torch.tensor([0] * 32 + [1] * 32 + [2] * 32 + [3] * 32 + [4] * 32))
    assert group_size(type("PerRow", (), {"group_size": -1, "in_features": 160})()) == 160  # -1: one group a row
    # (out, in) even for a square matrix, where a transposed weight would have the right shape
    assert torch.equal(dequantized_weight(q), q.dequantized()) and not torch.equal(q.dequantized(), q.dequantized().T)
    assert dequantized_weight(down).shape == (64, 160)
    q._frankenlab_weight = torch.zeros(64, 64)  # dequantized once on CPU: that copy is the weight
    assert torch.equal(dequantized_weight(q), torch.zeros(64, 64))
    reordered = FakeQuantLinear(torch.randn(8, 64), 4, 32, g_idx=torch.arange(64) % 2)
    assert not g_idx_trivial(reordered) and torch.equal(group_index(reordered), torch.arange(64) % 2)


@pytest.mark.slow  # only because importing gptqmodel takes ~20 s on a busy CPU
def test_gptqmodel_unpacking_matches_its_dequantize():
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # the set-up installs it: a broken install fails
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    q = TorchLinear(
        bits=4,
        group_size=128,
        sym=False,
        desc_act=False,
        in_features=256,
        out_features=64,
        bias=False,
        pack_dtype=torch.int32,
        register_buffers=True,
        backend=None,
    )
    w = lin.weight.detach().reshape(64, 2, 128)
    lo, hi = w.min(-1).values, w.max(-1).values
    scale = (hi - lo) / 15
    q.pack(lin, scale.contiguous(), torch.round(-lo / scale).contiguous(), (torch.arange(256) // 128).int())
    q.post_init()
    assert isinstance(q, BaseQuantLinear) and is_quantized_linear(q)  # gptqmodel's class and our test agree
    assert not is_quantized_linear(lin)
    codes, zeros = quant_codes(q)
    g = torch.arange(256) // 128
    mine = q.scales.float()[g].T * (codes.float() - zeros.float()[g].T)
    assert torch.allclose(mine, q.dequantize_weight().T.float(), atol=1e-4)
    storage, buffers = quantized_storage(q)
    assert storage.bytes == buffers


# -- whole models ----------------------------------------------------------------------------------
def test_tied_embeddings_counted_once(tiny):
    model = tiny.model
    cfg = model.config
    fp = footprint(model)
    comps = fp.components()
    assert comps["embeddings"] == cfg.vocab_size * cfg.hidden_size * 4
    assert comps["head"] == 0
    assert any("lm_head.weight is tied" in n for n in fp.notes)
    from frankenlab.pipeline.loading import count_parameters

    assert fp.weights_bytes == count_parameters(model) * 4
    # untie: the head becomes its own tensor
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert footprint(model).components()["head"] == cfg.vocab_size * cfg.hidden_size * 4


def test_components_kv_cache_and_summary(tiny):
    model = tiny.model
    cfg = model.config
    fp = footprint(model, context=512, batch=2)
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv_dim = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    comps = fp.components()
    assert comps["attention"] == layers * (2 * h * h + 2 * h * kv_dim) * 4
    assert comps["mlp"] == layers * 3 * h * inter * 4
    assert comps["norms"] == (2 * layers + 1) * h * 4
    assert comps["cache"] == 2 * layers * kv_dim * 512 * 2 * 4
    assert fp.total_bytes == fp.weights_bytes + comps["cache"] + comps["activations"]
    summary = footprint_summary(model)
    json.dumps(summary)
    assert summary["weights_bytes"] == fp.weights_bytes and summary["formats"] == {"fp32": fp.formats()["fp32"]}
    assert set(summary["what_if_weights_bytes"]) == {"bf16", "2:4+bf16", "int4-g128+bf16", "2:4+int4-g128+bf16"}


def test_what_if_matches_the_real_thing(tiny):
    model = tiny.model
    planned = footprint(model, assume=Assume.parse("2:4"))
    assert planned.assumed == "2:4"
    pruned = footprint(prune_nm(model, 2, 4))
    assert pruned.formats()["2:4 fp32"] == 7 * model.config.num_hidden_layers
    assert pruned.components() == planned.components()
    # as if quantized after pruning == pruned then really quantized (fake GPTQ keeping the zeros)
    planned_q = pruned.assuming(Assume.parse("int4-g32"))
    real_q = footprint(quantize_decoder(model, 4, 32))
    assert real_q.formats().get("2:4 int4 g32") == 7 * model.config.num_hidden_layers
    assert real_q.components()["mlp"] == planned_q.components()["mlp"]
    assert real_q.components()["attention"] == planned_q.components()["attention"]


def test_assume_parsing():
    a = Assume.parse("2:4+int4-g128+bf16")
    assert (a.nm, a.quant, a.dtype) == ((2, 4), (4, 128), "bfloat16")
    assert Assume.parse("int4").quant == (4, 128) and Assume.parse("w3g64").quant == (3, 64)
    for bad in ("4:2", "int12", "fp8", "2:4:8"):
        with pytest.raises(RecipeError):
            Assume.parse(bad)


def test_summary_does_not_scan_unchanged_tensors_again(tiny, monkeypatch):
    scanned = []

    def counting(weight, **kw):
        scanned.append(weight)
        return detect_storage(weight, **kw)

    monkeypatch.setattr(footprint_module, "detect_storage", counting)
    prune_nm(tiny.model, 2, 4)
    footprint_summary(tiny.model)
    # every tensor once: 8 layers x (7 linears + 2 norms) + embeddings + final norm (the head is tied)
    assert len(scanned) == 8 * 9 + 2
    scanned.clear()
    footprint_summary(tiny.model)
    assert scanned == []  # unchanged tensors are not scanned again
    with torch.no_grad():  # an in-place change is seen, and only the changed tensor is scanned
        tiny.model.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    assert footprint_summary(tiny.model)["formats"]["2:4 fp32"] == 7 * 8 - 1
    assert len(scanned) == 1 and scanned[0].shape == tiny.model.model.layers[0].mlp.up_proj.weight.shape


# -- targets ---------------------------------------------------------------------------------------
def test_bundled_targets():
    t = load_targets()
    assert {"siracusa", "gtx1080ti", "sbc8g", "h100"} <= set(t)
    s = t["siracusa"]
    assert (s.weights, s.activations, s.l1, s.memory) == (4 * 2**20, 4 * 2**20, 256 * 2**10, None)
    assert t["gtx1080ti"].memory == 11 * 2**30 and t["h100"].memory == 80 * 2**30


def test_sizes():
    assert parse_size("4 MiB", "x") == 4 * 2**20
    assert parse_size("256KiB", "x") == 2**18
    assert parse_size("8 GB", "x") == 8 * 10**9
    assert parse_size("1.5 GiB", "x") == 3 * 2**29
    assert parse_size(1024, "x") == 1024
    for bad in ("4 MB of RAM", "lots", "-1 MiB", 0, True, [1]):
        with pytest.raises(RecipeError):
            parse_size(bad, "x")


def test_verdicts():
    s = Target("siracusa", weights=4 * 2**20, activations=4 * 2**20)
    w, a = s.checks(weights_bytes=269_030_016, runtime_bytes=2 * 2**20)
    # 269,030,016 bytes against 4 MiB = 4,194,304 bytes: 64.14 times, shown with one decimal from 2x on
    assert not w.fits and w.text == "misses by 64.1\u00d7" and a.fits
    assert w.factor == pytest.approx(64.1418, abs=1e-4)
    assert a.text == "fits (50% of activations)"
    gpu = Target("gpu", memory=11 * 2**30)
    (c,) = gpu.verdict({"weights_bytes": 2 * 2**30, "runtime_bytes": 2**30})
    assert c.fits and c.need == 3 * 2**30 and math.isclose(c.factor, 3 / 11)
    (c,) = Target("tiny", memory=1000).checks(1500, 0)
    assert c.text == "misses by 1.50\u00d7"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[targets.x]\nmemory = "4 MiB"\nram = 3', "unknown key(s) ram"),
        ('[targets.x]\nlabel = "no sizes"', "needs either memory"),
        ('[targets.x]\nmemory = "4 MiB"\nweights = "1 MiB"', "gives both memory and weights"),
        ('[targets.x]\nmemory = "four megs"', "is not a size"),
        ("[targets.x]\nmemory = -5", "must be positive"),
        ("[targets.x\nmemory = 1", "not valid TOML"),
        ("", "no targets found"),
        ('[boards.x]\nmemory = "1 GiB"', "unknown top-level key(s) boards"),
        ('[targets."a b"]\nmemory = "1 GiB"', "may hold only letters"),
    ],
)
def test_bad_target_files_are_rejected(text, message):
    with pytest.raises(RecipeError, match="mine.toml") as err:
        parse_targets(text, "mine.toml")
    assert message in str(err.value)


def test_user_targets_file(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[targets.myboard]\nlabel = "my board"\nweights = "2 MiB"\nactivations = "512 KiB"\n')
    t = load_targets(f)
    assert t["myboard"].weights == 2 * 2**20 and "siracusa" in t
    with pytest.raises(RecipeError, match="does not exist"):
        load_targets(tmp_path / "missing.toml")


# -- command line ----------------------------------------------------------------------------------
def test_cli_json(tiny_model_dir, capsys):
    from frankenlab.tui.cli.main import main

    rc = main(["memory", "--model", str(tiny_model_dir), "--target", "siracusa", "--what-if", "2:4+int4-g32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["footprints"]) == {"as is", "2:4+int4-g32"}
    verdicts = out["targets"]["siracusa"]["verdicts"]["as is"]
    assert [v["memory"] for v in verdicts] == ["weights", "activations"]
    assert out["footprints"]["as is"]["components"]["head"] == 0


def test_cli_tables_and_errors(tiny_model_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    assert main(["memory", "--model", str(tiny_model_dir), "--target", "sbc8g"]) == 0
    text = capsys.readouterr().out
    assert "embeddings" in text and "fits" in text
    bad = tmp_path / "bad.toml"
    bad.write_text('[targets.x]\nmemory = "4 MiB"\nweights = "1 MiB"\n')
    assert main(["memory", "--model", str(tiny_model_dir), "--targets-file", str(bad)]) == 2
    assert "gives both memory and weights" in capsys.readouterr().out
    assert main(["memory", "--model", str(tiny_model_dir), "--target", "nope"]) == 2
    assert "unknown target" in capsys.readouterr().out
    assert main(["memory", "--list-targets"]) == 0
    assert "siracusa" in capsys.readouterr().out


@pytest.mark.slow
def test_bundled_model_footprint():
    from frankenlab.pipeline.loading import count_parameters, load_model

    lm = load_model(device="cpu", dtype="float32")
    fp = footprint(lm.model)
    n = count_parameters(lm.model)
    assert fp.weights_bytes == n * 4  # dense fp32, tied head counted once
    assert fp.components()["head"] == 0
    assert fp.cache.bytes == 2 * 30 * 3 * 64 * 512 * 4
    bf16 = fp.assuming(Assume.parse("bf16")).weights_bytes
    assert bf16 == n * 2
    # 2:4 + int4 g128 + bf16 by hand (SmolLM2-135M: 30 layers, hidden 576, MLP 1536, k/v 3 of 9 heads
    # = 192 wide, vocabulary 49152, head tied to the embeddings):
    # - per layer q, o 576x576, k, v 192x576, gate, up 1536x576, down 576x1536 = 3,538,944 weights, each
    #   half a 4-bit code kept + 4 index bits per group of 4 = 3/8 byte -> 1,327,104 bytes;
    # - groups of 128 inputs (a row of 576 has 5, of 1536 has 12): 2*576*5 + 2*192*5 + 2*1536*5 + 576*12
    #   = 29,952 per layer, each an fp16 scale + a 4-bit zero = 2.5 bytes -> 74,880 bytes;
    # - 30 layers x 1,401,984 = 42,059,520; embeddings 49152 x 576 x 2 = 56,623,104; 61 norms x 576 x 2
    #   = 70,272: 98,752,896 bytes, 23.54 times the 4 MiB (4,194,304 bytes) of siracusa's weight memory
    both = fp.assuming(Assume.parse("2:4+int4-g128+bf16")).weights_bytes
    assert both == 98_752_896
    siracusa = load_targets()["siracusa"]
    (w, a) = siracusa.verdict(fp.assuming(Assume.parse("2:4+int4-g128+bf16")))
    assert not w.fits and w.factor == pytest.approx(23.5445, abs=1e-4) and w.text == "misses by 23.5\u00d7"


def test_runner_records_footprints(tiny, tmp_path, data_dir):
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import record_run

    recipe = Recipe.loads(
        'name = "t"\n[evaluation]\nafter = "none"\n[[stages]]\nkind = "width"\npattern = "2:4"\nmethod = "magnitude"\n'
    )
    session = record_run(recipe, tmp_path, loaded=tiny, save_models=False, data_dir=data_dir)
    assert session.status == "done"
    base, pruned = (st.footprint for st in session.stages)
    assert base["formats"] == {"fp32": 74} and pruned["formats"]["2:4 fp32"] == 56
    assert pruned["weights_bytes"] < base["weights_bytes"]
    assert pruned["weights_bytes"] == footprint(tiny.model).weights_bytes  # the model the runner left behind


def test_per_layer_bytes(tiny):
    prune_nm(tiny.model, 2, 4)
    with torch.no_grad():
        tiny.model.model.layers[3].mlp.up_proj.weight.normal_()  # one matrix dense again
    layers = footprint(tiny.model).by_layer()
    assert len(layers) == 8 and layers[3] > layers[2] == layers[4]


def test_what_if_dtype_scales_runtime_and_keeps_ints(tiny):
    fp = footprint(tiny.model, context=128)
    half = fp.assuming(Assume.parse("bf16"))
    assert half.assumed == "bf16"
    assert half.weights_bytes * 2 == fp.weights_bytes
    assert half.cache.bytes * 2 == fp.cache.bytes and half.activation_bytes * 2 == fp.activation_bytes
    d = half.to_dict()
    assert d["parts"] == {"values": half.weights_bytes} and len(d["layers"]) == 8
    assert (
        Storage((4, 4), "int64").bytes == 128
        and Assume(dtype="bfloat16").apply(footprint(tiny.model).entries[0]).storage.dtype == "bfloat16"
    )
