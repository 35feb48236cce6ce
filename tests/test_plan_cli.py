"""`frankenlab plan` on the tiny model: verdicts, the recipe it writes (through the recipe loader), the
cache, bad input, and validation as a real (small) sweep."""

from __future__ import annotations

import json

import pytest

from frankenlab.pipeline.planner import budget as bd
from frankenlab.pipeline.planner.recipe_out import plan_layers, plan_stages
from frankenlab.pipeline.recipe import Recipe
from frankenlab.tui.cli.main import main

CHOICES = ["--choices", "patterns=none,2:4", "bits=16,4", "--method", "rtn"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir):
    """The sensitivity cache, filled once for the module (the first run measures, the rest read it)."""
    import torch

    d = tmp_path_factory.mktemp("sens-cache")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["plan", "--model", str(tiny_model_dir), "--budget", "50%", *CHOICES, "--cache-dir", str(d)]) == 0
    finally:
        torch.set_num_threads(n)
    return d


def plan(tiny_model_dir, cache, *args) -> int:
    return main(["plan", "--model", str(tiny_model_dir), *CHOICES, "--cache-dir", str(cache), *args])


def facts(tiny_model_dir):
    return bd.ModelFacts.from_config(json.loads((tiny_model_dir / "config.json").read_text()))


def test_fitting_budget_writes_a_recipe_that_loads_with_the_chosen_layers(tiny_model_dir, cache, tmp_path, capsys):
    f = facts(tiny_model_dir)
    budget = bd.embed_bytes(f) + 5 * bd.layer_bytes(f, "2:4/4") + 2 * bd.layer_bytes(f, "none/4")
    out = tmp_path / "plan"
    capsys.readouterr()
    assert plan(tiny_model_dir, cache, "--budget", str(budget), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "entries read from" in text and "sensitivities   0.0%" not in text  # the cache, nothing measured
    assert "predicted front" in text and "chosen plan, per source layer" in text and "fits:" in text
    assert "predicted ppl vs weight bytes" in text and "◆" in text  # the Plan pane's braille plot (plan_render)
    data = json.loads((out / "plan.json").read_text())
    chosen = data["chosen"]["choices"]
    assert len(chosen) == 8 and data["chosen"]["bytes"] <= budget
    assert data["chosen"]["bytes"] == bd.embed_bytes(f) + sum(bd.layer_bytes(f, c) for c in chosen)
    assert all(c != "skip" for c in chosen[:4] + chosen[-2:]), "protected layers are never skipped"
    pts = data["front"]["points"]
    assert all(a["bytes"] < b["bytes"] and a["delta"] > b["delta"] for a, b in zip(pts, pts[1:], strict=False))
    # the best plan within the budget: the largest front point that fits
    assert data["chosen"] == [p for p in pts if p["bytes"] <= budget][-1]
    # the recipe round-trips through the loader into the intended per-layer choices
    recipe = Recipe.load(out / "recipe.toml")
    recipe.check_for(8)
    stages = recipe.to_dict()["stages"]
    assert plan_layers(stages, 8) == chosen
    assert [s["kind"] for s in stages] == [s["kind"] for s in plan_stages(chosen)]
    assert recipe.evaluation.perplexity == ("wikitext2-concat-512",) and recipe.evaluation.ppl_limit == 32


def test_plan_stages_translate_to_post_depth_numbers_and_leave_out_identities():
    choices = ["none/16", "none/8", "2:4/4", "2:4/4", "skip", "skip", "none/16", "1:8/16"]
    stages = plan_stages(choices, group_size=64)
    assert stages[0] == {"kind": "depth", "k": 2, "layers": [4, 5]}  # source numbers
    assert stages[1] == {"kind": "width", "patterns": {"0-1": "none", "2-3": "2:4", "4": "none", "5": "1:8"}}
    assert stages[2] == {
        "kind": "gptq",
        "bits": 4,
        "group_size": 64,
        "layer_bits": {"0": 16, "1": 8, "2-3": 4, "4-5": 16},
    }
    recipe = Recipe.from_dict({"stages": stages})
    recipe.check_for(8)
    depth, width, gptq = (s.config for s in recipe.stages)
    assert depth.layers == (4, 5)
    assert [width.patterns.for_layer(j, "none") for j in range(6)] == ["none", "none", "2:4", "2:4", "none", "1:8"]
    assert [gptq.layer_bits.for_layer(j) for j in range(6)] == [16, 8, 4, 4, 16, 16] and gptq.group_size == 64
    assert plan_layers(recipe.to_dict()["stages"], 8) == choices
    assert plan_stages(["none/16"] * 3) == []
    assert [s["kind"] for s in plan_stages(["none/4", "none/16"])] == ["gptq"]
    assert [s["kind"] for s in plan_stages(["2:4/16", "skip"])] == ["depth", "width"]
    protected = plan_stages(["skip", "none/16", "none/16", "none/16", "none/16", "none/16", "none/16", "skip"])
    assert protected[0]["protected_first"] == 0 and protected[0]["protected_last"] == 0
    Recipe.from_dict({"stages": protected}).check_for(8)


def test_no_fit_verdict_names_the_smallest_footprint_and_the_largest_dense_model(
    tiny_model_dir, cache, tmp_path, capsys
):
    f = facts(tiny_model_dir)
    targets = tmp_path / "targets.toml"
    targets.write_text('[targets.mcu]\nweights = "64 KiB"\n[targets.board]\nmemory = "2 MiB"\n')
    capsys.readouterr()
    out = tmp_path / "nofit"
    rc = plan(tiny_model_dir, cache, "--target", "mcu", "--targets-file", str(targets), "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 1
    smallest = bd.embed_bytes(f) + 6 * bd.layer_bytes(f, "2:4/4")  # 2 layers skipped, 6 protected at 2:4 int4
    assert "no plan fits 64.00 KiB" in text
    assert f"smallest reachable footprint is {smallest / 1024:.2f} KiB" in text
    holds = int(64 * 1024 / bd.bytes_per_param(f, "2:4/4"))
    assert "most aggressive format searched (2:4/4" in text and "dense parameters" in text
    data = json.loads((out / "plan.json").read_text())
    assert data["chosen"] is None and data["verdict"]["largest_dense_params"] == holds
    assert data["verdict"]["smallest"]["bytes"] == smallest and not (out / "recipe.toml").exists()
    # one shared memory: the budget is that memory minus a stated runtime reserve
    assert plan(tiny_model_dir, cache, "--target", "board", "--targets-file", str(targets)) == 0
    text = capsys.readouterr().out
    assert "minus the runtime reserve" in text and "KV cache + decode activations at 512 tokens" in text


def test_max_ppl_picks_the_smallest_plan_within_the_bound(tiny_model_dir, cache, tmp_path, capsys):
    out = tmp_path / "q"
    assert plan(tiny_model_dir, cache, "--budget", "100%", "--out", str(out)) == 0
    front = json.loads((out / "plan.json").read_text())["front"]["points"]
    bound = sorted(p["ppl"] for p in front)[len(front) // 2]
    assert plan(tiny_model_dir, cache, "--max-ppl", str(bound), "--out", str(out)) == 0
    chosen = json.loads((out / "plan.json").read_text())["chosen"]
    assert chosen == next(p for p in front if p["ppl"] <= bound)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "lots"], "is not a size"),
        (["--budget", "5%", "--target", "siracusa"], "give one budget"),
        ([], "give a budget"),
        (["--target", "nowhere"], "unknown target 'nowhere'"),
        (["--budget", "1MiB", "--choices", "patterns=3:2"], "N:M needs 1 <= N < M"),
        (["--budget", "1MiB", "--choices", "bits=5"], "bits '5'"),
        (["--budget", "1MiB", "--choices", "colours=red"], "write patterns="),
        (["--budget", "1MiB", "--validate", "2"], "give --out DIR"),
        (["--budget", "1MiB", "--group-size", "100"], "power of 2"),
        (["--budget", "1MiB", "--validate-within", "150%"], "between 0 and 100%"),
        (["--budget", "1MiB", "--validate-within", "wide"], "between 0 and 100%"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(tiny_model_dir, tmp_path, capsys, args, message):
    assert main(["plan", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "model" not in captured.out, "refused before loading the model"
    assert not list(tmp_path.iterdir()), "nothing measured or written"


def test_validate_runs_front_points_as_a_sweep(tiny_model_dir, cache, tmp_path, capsys, data_dir):
    f = facts(tiny_model_dir)
    budget = bd.embed_bytes(f) + 8 * bd.layer_bytes(f, "2:4/4") + 1000
    out = tmp_path / "val"
    capsys.readouterr()
    rc = plan(
        tiny_model_dir,
        cache,
        "--budget",
        str(budget),
        "--validate",
        "2",
        "--eval-windows",
        "2",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
    )
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert "predicted vs measured" in text and "Spearman rank correlation" in text
    data = json.loads((out / "plan.json").read_text())
    plans = data["validation"]["plans"]
    assert len(plans) == 2 and all(p["status"] == "done" for p in plans)
    for p in plans:
        assert p["measured_ppl"] > 0 and p["predicted_ppl"] > 0
        # the planner's bytes are the footprint's (dense floats as bf16) of the model each plan made, or
        # an upper bound where low-bit GPTQ codes let the footprint find a cheaper mask (pipeline/weight_bytes.py)
        assert 0.97 * p["bytes"] <= p["measured_bytes"] <= p["bytes"], p
    assert data["calibration"]["plans"] == 2 and set(data["calibration"]["multipliers"]) == {"skip", "sparse", "quant"}
    assert (out / "validation" / "sweep.json").is_file()
    Recipe.load(out / "recipe.toml").check_for(8)


def test_ctrl_c_while_measuring_exits_130_and_keeps_the_cache(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import threading

    from frankenlab.tui.cli import plan as plan_cli

    cancel = threading.Event()
    cancel.reason = "Ctrl-C"
    cancel.set()
    monkeypatch.setattr(plan_cli, "ctrl_c_cancels", lambda console, verb: (cancel, lambda: None))
    out = tmp_path / "out"
    assert plan(tiny_model_dir, tmp_path / "cache", "--budget", "50%", "--out", str(out)) == 130
    text = capsys.readouterr().out
    assert "cancelled: the sensitivities measured so far are kept" in text and "Traceback" not in text
    assert not out.exists(), "nothing written after a cancel"
