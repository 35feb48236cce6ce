"""GPTQ and EoRA stages on the tiny LLaMA, through the runner: depth 1 + width 2:4 + LoRA + GPTQ + EoRA.

One quantization is shared by the tests of this module (gptqmodel on a 2-core CPU takes tens of
seconds even for the tiny model). Group size 32 fits the tiny model's 64 / 160 dimensions.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import RecipeError
from pipeline.recipe import Recipe
from sessions import record_run

CHAIN = """
[[stages]]
kind = "depth"
k = 1
metric = "l1"
[[stages]]
kind = "width"
pattern = "2:4"
method = "magnitude"
[[stages]]
kind = "lora"
steps = 2
batch_size = 2
seq_len = 32
dataset = "wiki"
[[stages]]
kind = "gptq"
bits = 4
group_size = 32
samples = 8
seq_len = 32
[[stages]]
kind = "eora"
rank = 4
samples = 8
seq_len = 32
"""


def recipe_text(model_dir, stages: str) -> str:
    return f"""
name = "tiny-recovery"
model = "{model_dir}"
[calibration]
samples = 8
seq_len = 32
[evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
{stages}
"""


@pytest.fixture(scope="module")
def chain(tiny_model_dir, data_dir, tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("recovery") / "run"
    cwd = Path.cwd()
    scratch = tmp_path_factory.mktemp("cwd")
    os.chdir(scratch)  # gptqmodel must not write ./logs into wherever we run from
    try:
        session = record_run(Recipe.loads(recipe_text(tiny_model_dir, CHAIN)), out, data_dir=data_dir)
    finally:
        os.chdir(cwd)
    return session, out, scratch


def test_chain_finishes_with_finite_perplexity(chain):
    session, out, scratch = chain
    errors = [e for e in session.events if e.get("level") == "error" or e.get("type") == "RunFailed"]
    assert session.status == "done", errors
    for st in session.stages:
        assert st.status == "done"
        ppl = st.metric("perplexity")
        assert ppl is not None and math.isfinite(ppl["value"]), st.kind
    assert not (scratch / "logs").exists()


def test_gptq_report_and_saved_model(chain):
    session, out, _ = chain
    st = next(s for s in session.stages if s.kind == "gptq")
    r = st.report
    assert (r["bits"], r["group_size"], r["desc_act"]) == (4, 32, False)
    qdir = Path(r["quantized_path"])
    assert st.artifact == str(qdir) and (qdir / "quantize_config.json").is_file()
    assert json.loads((qdir / "quantize_config.json").read_text())["bits"] == 4
    assert r["disk_bytes"] > 0 and r["disk_bytes"] < r["prequant_disk_bytes"]
    assert r["quantized_linears"] == 7 * 7  # 8 layers - 1 removed, 7 projections each
    assert r["density_before"] == pytest.approx(0.5, abs=1e-3)  # width 2:4, LoRA merged with the mask
    assert 0.5 <= r["density_after"] <= 1.0 and 0.0 <= r["zeros_kept_fraction"] <= 1.0
    assert (qdir.parent / "logs").is_dir() and not (qdir.parent / "offload").exists()


def test_eora_adapter_produced_and_applied(chain):
    from pipeline import quant

    session, out, _ = chain
    st = next(s for s in session.stages if s.kind == "eora")
    adapter = Path(st.report["adapter_path"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert st.report["layers_with_adapter"] == 7 * 7
    manifest = json.loads((adapter.parent / "frankenlab-quant.json").read_text())
    assert manifest["adapter"] == str(adapter) and manifest["rank"] == 4
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    plain = quant.load_quantized(manifest["quantized"]).model
    with_eora = quant.load_quantized(manifest["quantized"], adapter=adapter, rank=4).model
    a, b = plain(input_ids=ids).logits, with_eora(input_ids=ids).logits
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)
    reply = with_eora.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert reply.shape == (1, ids.shape[1] + 3)  # chat works on the quantized model with its adapter


@pytest.mark.parametrize("stages, message", [
    ('[[stages]]\nkind = "eora"', "eora needs a gptq stage before it"),
    ('[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "lora"', "LoRA after GPTQ is not supported"),
    ('[[stages]]\nkind = "gptq"\nbits = 5', "bits must be one of 2, 3, 4, 8"),
    ('[[stages]]\nkind = "gptq"\ngroup_size = 100', "group_size must be -1"),
    ('[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "eora"\nrank = 0', "rank must be at least 1"),
    ('[[stages]]\nkind = "gptq"\ndesc_act = "yes"', "expected true or false"),
    ('[[stages]]\nkind = "lora"\nalpha = -1', "alpha must be positive"),
    ('[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "eora"\ndataset = "imagenet"', "unknown calibration dataset"),
])
def test_recipe_validation(stages, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.loads(recipe_text("default", stages))


def test_full_chain_recipe_round_trips():
    r = Recipe.loads(recipe_text("default", CHAIN))
    assert Recipe.loads(r.dumps()).to_dict() == r.to_dict()
    assert [s.kind for s in r.stages] == ["depth", "width", "lora", "gptq", "eora"]


def test_eora_without_quantized_model_fails_clearly(tiny):
    from pipeline.context import StageContext
    from pipeline.stages import eora

    with pytest.raises(RecipeError, match="eora needs a gptq stage"):
        eora.run(tiny.model, StageContext(tiny.tokenizer, torch.device("cpu")), eora.Config())


def test_dequantized_weights_match_prequant_weights(chain):
    """Square projections (q_proj, o_proj) must not come back transposed."""
    from safetensors.torch import load_file

    from pipeline import quant

    session, out, _ = chain
    st = next(s for s in session.stages if s.kind == "gptq")
    pre = Path(st.report["quantized_path"]).parent / "prequant"
    original = {}
    for f in pre.glob("*.safetensors"):
        original.update(load_file(str(f)))
    loaded = quant.load_quantized(st.report["quantized_path"])
    checked = 0
    for name, mod in loaded.model.named_modules():
        if hasattr(mod, "qweight") and name.endswith(("q_proj", "o_proj")):
            w = quant.dequantized_weight(mod)
            ref = original[name + ".weight"].float()
            assert w.shape == ref.shape
            err = (w - ref).norm() / ref.norm()
            assert err < 0.25, f"{name}: relative error {err:.3f} (transposed?)"
            checked += 1
    assert checked == 2 * 7
