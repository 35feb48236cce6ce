"""The compact on-disk form: its size is the computed footprint, and it loads back to the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.compact import (
    COMPACT_FILE,
    decode_index,
    encode_index,
    exact_keep,
    load_compact,
    read_header,
    save_compact,
)
from frankenlab.pipeline.footprint import Assume, footprint
from frankenlab.pipeline.tensor_formats import nm_index_bits
from tests.test_memory import nm_matrix, prune_nm, quantize_decoder


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture
def ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 8), (4, 8), (12, 16), (1, 2)])
def test_index_round_trip_and_size(n, m):
    w = nm_matrix(16, 64, n, m)
    w[0, :m] = 0  # a group with more zeros than the pattern needs
    keep = exact_keep((w != 0).reshape(16, 64 // m, m), m - n)
    assert (keep.sum(-1) == m - n).all() and (keep | (w == 0).reshape(keep.shape)).all()
    packed, kind = encode_index(keep, n, m)
    assert packed.numel() == -(-16 * 64 // m * nm_index_bits(n, m) // 8)
    assert torch.equal(decode_index(packed, kind, n, m, 16, 64 // m), keep)


def assert_file_within_plan_reserve(model, report):
    """The planner keeps `header_reserve` free for this file's header (and byte rounding): a plan of
    computed bytes B within budget - reserve writes a file within the budget."""
    from frankenlab.pipeline.planner.budget import ModelFacts, header_reserve

    reserve = header_reserve(ModelFacts.from_config(model.config.to_dict()))
    assert report.file_bytes - report.computed_bytes <= reserve, (report.header_bytes, reserve)


def test_2to4_compact_size_and_logits(tiny, tmp_path, ids):
    model = prune_nm(tiny.model, 2, 4)
    computed = footprint(model).weights_bytes
    report = save_compact(model, tmp_path / "c", tokenizer=tiny.tokenizer)
    assert report.computed_bytes == computed
    assert_file_within_plan_reserve(model, report)
    assert abs(report.file_bytes / computed - 1) < 0.05  # whole file, headers included
    assert abs(report.payload_bytes - computed) <= 8 * 80  # tensor bytes: exact up to byte rounding
    assert (tmp_path / "c" / "tokenizer_config.json").exists()
    header = read_header(tmp_path / "c")
    assert header["formats"]["2:4 fp32"] == 56
    restored = load_compact(tmp_path / "c")
    assert torch.equal(logits(restored, ids), logits(model, ids))
    # and the restored model is found 2:4 again, to the byte
    assert footprint(restored).weights_bytes == computed


@pytest.mark.parametrize("pattern", ["1:8", "12:16", "unstructured"])
def test_other_sparsity_in_bf16(tiny, tmp_path, ids, pattern):
    model = tiny.model
    if pattern == "unstructured":
        from frankenlab.pipeline.layerwise import linear_modules
        from frankenlab.pipeline.loading import decoder_layers
        from frankenlab.pipeline.stages.width import ALL_PROJECTIONS, unstructured_prune_mask

        with torch.no_grad():
            for layer in decoder_layers(model):
                for lin in linear_modules(layer, ALL_PROJECTIONS).values():
                    lin.weight.mul_(unstructured_prune_mask(lin.weight.abs(), 0.6))
    else:
        prune_nm(model, *map(int, pattern.split(":")))
    report = save_compact(model, tmp_path, dtype="bfloat16")
    computed = footprint(model, assume=Assume(dtype="bfloat16"))
    assert report.computed_bytes == computed.weights_bytes
    assert_file_within_plan_reserve(model, report)
    assert abs(report.payload_bytes - computed.weights_bytes) <= 8 * 80
    formats = read_header(tmp_path)["formats"]
    label = "sparse" if pattern == "unstructured" else f"{pattern} bf16"  # sparse 59% / 60% bf16 by row width
    assert sum(v for k, v in formats.items() if k.startswith(label)) == 56
    restored = load_compact(tmp_path)
    assert next(restored.parameters()).dtype == torch.bfloat16
    reference = model.to(torch.bfloat16)
    ref_state = reference.state_dict()
    assert all(torch.equal(t, ref_state[k]) for k, t in restored.state_dict().items())
    # not bit-equal: .to(bfloat16) also casts the rotary inv_freq buffer, a bf16-built model keeps it fp32
    assert torch.allclose(logits(restored, ids), logits(reference, ids), atol=0.1)


@pytest.mark.parametrize("sparse", ["dense", "2:4", "unstructured"])
def test_quantized_compact(tiny, tmp_path, ids, sparse):
    model = tiny.model
    if sparse == "2:4":
        prune_nm(model, 2, 4)
    if sparse == "unstructured":  # zeros without a pattern
        from frankenlab.pipeline.stages.width import unstructured_prune_mask

        with torch.no_grad():
            for p in model.model.layers.parameters():
                if p.dim() == 2:
                    p.mul_(unstructured_prune_mask(p.abs(), 0.6))
    expected = logits(quantize_decoder(model, bits=4, group=32), ids)
    fp = footprint(model)
    quantized = {k: v for k, v in fp.formats().items() if k.endswith("int4 g32")}
    # codes that land on the zero point are zeros too: a dense matrix may show 1:32, a 2:4 one 1:2
    assert sum(quantized.values()) == 56
    if sparse == "2:4":
        assert all(":" in k for k in quantized)
    if sparse == "unstructured":
        assert all(k.startswith("sparse") for k in quantized)
    report = save_compact(model, tmp_path)
    assert report.computed_bytes == fp.weights_bytes
    assert_file_within_plan_reserve(model, report)
    assert abs(report.payload_bytes - fp.weights_bytes) <= 8 * 56 * 4  # byte rounding per packed tensor
    restored = load_compact(tmp_path, dtype="float32")
    assert torch.allclose(logits(restored, ids), expected, atol=1e-4)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_compact(tmp_path / "nothing")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / COMPACT_FILE))
    with pytest.raises(RecipeError, match="not a frankenlab compact file"):
        load_compact(tmp_path)
    # PEFT-style adapters (lora_A / lora_B beside the base weight) count as adapters, and are refused
    from frankenlab.pipeline.loading import decoder_layers

    for layer in decoder_layers(tiny.model):
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            proj.add_module("lora_A", torch.nn.Linear(proj.in_features, 4, bias=False))
            proj.add_module("lora_B", torch.nn.Linear(4, proj.out_features, bias=False))
    fp = footprint(tiny.model)
    assert fp.components()["adapters"] == 8 * 4 * ((64 + 64) + (64 + 32)) * 4  # r=4: q (64->64), v (64->32)
    with pytest.raises(RecipeError, match="merge the LoRA"):
        save_compact(tiny.model, tmp_path / "lora")


def test_cli_compact(tiny_model_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    out = tmp_path / "compact"
    assert (
        main(["memory", "--model", str(tiny_model_dir), "--target", "siracusa", "--compact", str(out), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)["compact"]
    assert report["computed_bytes"] == report["payload_bytes"]
    # the compact folder loads back through the same command
    assert main(["memory", "--model", str(out), "--target", "siracusa", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["footprints"]["as is"]["weights_bytes"] == report["computed_bytes"]


def _gptq_pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """GPTQ's 3-bit layout (GPTQ-for-LLaMa's `pack`, as gptqmodel writes it): 32 rows of codes into 3
    int32 words per column, code 10 split over words 0/1 and code 21 over words 1/2."""
    rows, cols = codes.shape
    c = codes.long()
    out = torch.zeros(rows // 32 * 3, cols, dtype=torch.int64)
    i = row = 0
    while row < out.shape[0]:
        for j in range(i, i + 10):
            out[row] |= c[j] << (3 * (j - i))
        i += 10
        out[row] |= c[i] << 30
        row += 1
        out[row] |= (c[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            out[row] |= c[j] << (3 * (j - i) + 1)
        i += 10
        out[row] |= c[i] << 31
        row += 1
        out[row] |= (c[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            out[row] |= c[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    out &= 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_3bit_gptq_codes_unpack_exactly():
    """3-bit codes straddle int32 words; unpacking them (for the footprint and the compact form) is
    exact (checked here against GPTQ's packer; on a real GPTQ model against gptqmodel's kernel)."""
    from frankenlab.pipeline.quant_linear import unpack_rows

    codes = torch.randint(0, 8, (128, 5), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(unpack_rows(_gptq_pack_3bit(codes), 3, 128), codes)
    assert torch.equal(unpack_rows(_gptq_pack_3bit(codes), 3, 100), codes[:100])
