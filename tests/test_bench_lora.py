"""The LoRA benchmarks run end to end on the tiny LLaMA (figures printed, never asserted as timings)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench_distill, bench_lora, lora_measure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_lora_compares_three_ways_on_equal_work(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "lora.json"
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--steps", "2", "--batch", "2"]
    bench_lora.main(argv + ["--seq-len", "32", "--repeats", "1", "--gemm-seconds", "0.01", "--json", str(out)])
    figures = json.loads(out.read_text())
    for key in ("plain_peft_ratio", "trainer_ratio"):
        assert 0 < figures[key] < math.inf
    summary = figures["summary"]
    assert set(summary) == {"ours", "plain", "trainer"}
    for s in summary.values():
        assert s["tokens_per_cpu_s"] > 0 and s["cpu_seconds_per_step"] > 0 and s["peak_rss_gib"] > 0
        assert 0 < s["ceiling_fraction_fp32"] < 1
    # the same windows in the same order from the same adapter initialisation: the same losses
    assert summary["plain"]["first_loss"] == pytest.approx(summary["ours"]["first_loss"], rel=1e-3)
    assert abs(figures["plain_loss_rel_diff"]) < 0.02 and abs(figures["trainer_loss_rel_diff"]) < 0.02
    assert [r["steps_timed"] for r in figures["runs"]] == [1, 1, 1]
    ours, plain = summary["ours"]["tokens_per_cpu_s"], summary["plain"]["tokens_per_cpu_s"]
    assert figures["plain_peft_ratio"] == pytest.approx(ours / plain)  # ours over plain, not the other way round
    assert figures["trainer_ratio"] == pytest.approx(ours / summary["trainer"]["tokens_per_cpu_s"])
    assert figures["cpu"]["capability"] and "avx512_bf16" in figures["cpu"]["flags"]
    for name in ("ours", "plain"):
        b = figures["breakdown"][name]
        assert set(b["seconds"]) == set(lora_measure.KINDS)
        assert b["seconds"]["gemm"] > 0 and b["seconds"]["optimizer"] > 0
        assert sum(b["seconds"].values()) == pytest.approx(b["total"])
    printed = capsys.readouterr().out
    assert "CPU capability: torch" in printed and "where step 2 of ours" in printed and "ours / plain" in printed


def test_training_flops_count_forward_backward_and_adapters(tiny):
    from benchmarks.ceiling import flops_per_token

    f = lora_measure.train_flops_per_token(tiny.model, 64, 8, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert f["forward"] == flops_per_token(tiny.model, 64)
    # tiny: hidden 64, 4 heads of 16, 2 kv heads: q 64+64, k 64+32, v 64+32, o 64+64 per layer, 8 layers
    assert f["adapters"] == 6 * 8 * (128 + 96 + 96 + 128) * 8
    # backward: every linear's and the head's input gradient (not layer 0's q/k/v) and attention twice
    layer0_qkv = 64 * 64 + 2 * 32 * 64
    cfg = tiny.model.config
    attention = 2 * 2 * cfg.num_attention_heads * 16 * (64 + 1) / 2 * cfg.num_hidden_layers
    linear_and_head = (f["forward"] - attention) / 2
    assert f["backward"] == pytest.approx(2 * (linear_and_head - layer0_qkv) + 2 * attention)
    assert f["total"] == f["forward"] + f["backward"] + f["adapters"]


def test_budget_steps_from_the_probe():
    # 10 CPU-s fixed, 5 per step: 600 CPU-s buy 118 steps
    assert bench_distill.steps_for_budget([(1, 15.0), (3, 25.0)], 600) == (118, 10.0, 5.0)
    # a noisy slope below the per-step cost seen inside the longer probe does not buy extra steps
    assert bench_distill.steps_for_budget([(1, 15.0), (3, 15.2)], 600, in_run=5.0)[0] == 118
    assert bench_distill.steps_for_budget([(1, 500.0), (3, 900.0)], 100)[0] == 1  # at least one step


def test_bench_distill_runs_on_the_tiny_model(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "distill.json"
    losses = ["ce", "kd"] if "loss" in bench_distill.stage_fields() else ["ce"]
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--configs", "depth", "--losses", *losses]
    bench_distill.main(
        argv + ["--budget-cpu-s", "2", "--windows", "1", "--batch", "2", "--seq-len", "32"] + ["--json", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["loss"] for r in rows] == losses and all(r["config"] == "Depth 2" for r in rows)
    for r in rows:
        assert r["steps"] >= 1 and r["cpu_seconds"] > 0 and [s for s, _ in r["probe"]] == [1, 3]
        assert math.isfinite(r["ppl_before"]) and math.isfinite(r["ppl_after"]) and r["ppl_after"] != r["ppl_before"]
