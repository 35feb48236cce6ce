"""End to end on the bundled SmolLM2-135M-Instruct: depth 2 + width 2:4 + LoRA + GPTQ 4-bit + EoRA.

Budget on a 2-core CI machine: at most 6 minutes (about 2.5 measured on a shared 2-core box), so
the stages run with small settings: L1 depth ranking, 2 LoRA steps, 8 calibration windows for
GPTQ and EoRA, EoRA rank 8. `benchmarks/bench_recovery.py` runs the chain with the defaults.
Perplexity is measured on the baseline and the final model only, on 4 windows (named protocol).
"""

import json
import math
from pathlib import Path

import pytest

from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.stages.width import satisfies_nm
from frankenlab.sessions import record_run

pytestmark = pytest.mark.slow

RECIPE = """
name = "e2e-recovery"
model = "default"
[calibration]
samples = 16
seq_len = 128
[evaluation]
perplexity = ["wikitext2-concat-512"]
ppl_limit = 4
samples = false
after = "last"
[[stages]]
kind = "depth"
k = 2
metric = "l1"
[[stages]]
kind = "width"
pattern = "2:4"
[[stages]]
kind = "lora"
steps = 2
batch_size = 2
seq_len = 128
[[stages]]
kind = "gptq"
samples = 8
[[stages]]
kind = "eora"
rank = 8
samples = 8
"""


def test_depth_width_lora_gptq_eora_on_bundled_model(tmp_path, data_dir):
    session = record_run(Recipe.loads(RECIPE), tmp_path / "o", data_dir=data_dir)
    assert session.status == "done", [e for e in session.events if e.get("level") == "error"][-1:]
    lora_st, gptq_st, eora_st = session.stages[3], session.stages[4], session.stages[5]
    # LoRA: the 2:4 pattern survives the merge
    assert lora_st.report["sparsity"].startswith("mask re-applied after merge")
    assert lora_st.report["density_after"] == pytest.approx(0.5, abs=1e-3)  # a few weights were 0 already
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(lora_st.artifact)
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert satisfies_nm(q, 2, 4)
    assert (Path(lora_st.report["adapter"]) / "adapter_config.json").is_file()
    # GPTQ: a 4-bit model in gptqmodel's format, smaller on disk, finite perplexity
    r = gptq_st.report
    assert r["bits"] == 4 and r["group_size"] == 128 and r["quantized_linears"] == 28 * 7
    assert r["disk_bytes"] < r["prequant_disk_bytes"] / 2
    assert json.loads((Path(r["quantized_path"]) / "quantize_config.json").read_text())["bits"] == 4
    # EoRA: adapter beside the quantized model, applied to every quantized projection
    assert (Path(eora_st.report["adapter_path"]) / "adapter_model.safetensors").is_file()
    assert eora_st.report["layers_with_adapter"] == 28 * 7
    # the EoRA artifact is its stage folder: a manifest naming the quantized model and the adapter,
    # so that it opens with the adapter applied (pipeline.quant_folders.describe_folder)
    assert (Path(eora_st.artifact) / "frankenlab-quant.json").is_file()
    assert gptq_st.report["pattern_holds"] is True  # masked GPTQ kept the 2:4 zeros
    base, final = session.stages[0].metric("perplexity"), eora_st.metric("perplexity")
    assert math.isfinite(final["value"]) and final["protocol"] == base["protocol"]
    assert final["value"] < 2000  # 2:4 on a 135M model costs a lot (about 31 -> 350 here) but it is not broken
