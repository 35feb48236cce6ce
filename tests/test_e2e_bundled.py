"""End to end on the bundled SmolLM2-135M-Instruct: `frankenlab run` as a user would run it."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from frankenlab.pipeline.stages.width import ALL_PROJECTIONS, satisfies_nm

pytestmark = pytest.mark.slow

RECIPE = """
name = "e2e-depth2-width2of4"
[model]
source = "default"
[calibration]
samples = 16
seq_len = 128
[evaluation]
perplexity = ["wikitext2-concat-512"]
ppl_limit = 4
samples = false
[[stages]]
kind = "depth"
k = 2
metric = "perplexity"
samples = 4
[[stages]]
kind = "width"
pattern = "2:4"
"""


def test_frankenlab_run_on_bundled_model(tmp_path, data_dir):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "frankenlab.tui",
            "run",
            str(tmp_path / "r.toml"),
            "--out",
            str(tmp_path / "o"),
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    session = json.loads((tmp_path / "o" / "session.json").read_text())
    base, depth, width = session["stages"]
    assert base["num_layers"] == 30 and depth["num_layers"] == 28
    assert len(depth["report"]["removed"]) == 2
    assert all(4 <= i < 28 for i in depth["report"]["removed"]), "protected layers stay"
    ppl = [s["metrics"][0]["value"] for s in session["stages"]]
    assert 5 < ppl[0] < 60, f"baseline perplexity of SmolLM2-135M should be sane, got {ppl[0]}"
    assert ppl[2] > ppl[0]
    model = AutoModelForCausalLM.from_pretrained(width["artifact"])
    assert model.config.num_hidden_layers == 28 and len(model.model.layers) == 28
    for layer in model.model.layers:
        for name in ALL_PROJECTIONS:
            mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert satisfies_nm(mod.weight, 2, 4)
    # a few weights are exactly zero already in the dequantized GGUF, so density can sit just under 0.5
    assert width["report"]["targeted_density"] == pytest.approx(0.5, abs=1e-4)
