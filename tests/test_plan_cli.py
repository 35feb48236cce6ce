"""`frankenlab plan` on the tiny model: verdicts, the recipe it writes (through the recipe loader), the
cache, bad input, and validation as a real (small) sweep."""

from __future__ import annotations

import json

import pytest

from frankenlab.pipeline.planner import budget as bd
from frankenlab.pipeline.planner.recipe_out import plan_layers, plan_stages
from frankenlab.pipeline.recipe import Recipe
from frankenlab.tui.cli.main import main

CHOICES = ["--choices", "patterns=none,2:4", "bits=16,4", "--method", "rtn", "--around", "none/16"]


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
    budget = bd.header_reserve(f) + bd.embed_bytes(f) + 5 * bd.layer_bytes(f, "2:4/4") + 2 * bd.layer_bytes(f, "none/4")
    out = tmp_path / "plan"
    capsys.readouterr()
    assert plan(tiny_model_dir, cache, "--budget", str(budget), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "entries read from" in text and "sensitivities   0.0%" not in text  # the cache, nothing measured
    assert "predicted front" in text and "chosen plan, per source layer" in text and "fits:" in text
    assert "predicted ppl vs weight bytes" in text and "◆" in text  # the Plan pane's braille plot (plan_render)
    data = json.loads((out / "plan.json").read_text())
    chosen = data["chosen"]["choices"]
    reserve = bd.header_reserve(f)  # kept free for the compact file's header
    assert data["budget"]["header"] == reserve and f"{reserve / 1024:.2f} KiB of it kept for the compact file" in text
    assert len(chosen) == 8 and data["chosen"]["bytes"] <= budget - reserve
    assert data["chosen"]["bytes"] == bd.embed_bytes(f) + sum(bd.layer_bytes(f, c) for c in chosen)
    assert all(c != "skip" for c in chosen[:4] + chosen[-2:]), "protected layers are never skipped"
    pts = data["front"]["points"]
    assert all(a["bytes"] < b["bytes"] and a["delta"] > b["delta"] for a, b in zip(pts, pts[1:], strict=False))
    # the best plan within the budget: the largest front point that fits
    assert data["chosen"] == [p for p in pts if p["bytes"] <= budget - reserve][-1]
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
    assert plan(tiny_model_dir, cache, "--max-ppl", "1e9", "--out", str(out)) == 0  # no budget: no corrections
    data = json.loads((out / "plan.json").read_text())
    front = data["front"]["points"]
    assert data["chosen"] == front[0] and data["sensitivities"]["corrections"] == {}
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
        (["--budget", "1MiB", "--around", "skip"], "cannot be 'skip'"),
        (["--budget", "1MiB", "--around", "12:16/4"], "not in the choice set"),
        (["--budget", "1MiB", "--around", "4:2/4"], "N:M needs"),
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
    budget = bd.header_reserve(f) + bd.embed_bytes(f) + 8 * bd.layer_bytes(f, "2:4/4") + 1000
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
    # two front points, and the plan the refitted front would choose when it is not one of them
    assert len(plans) == (3 if "calibrated" in data and "its plan is measured too" in text else 2)
    assert all(p["status"] == "done" for p in plans)
    # the plan kept is the best measured one within the budget (what a plan may take)
    fits = [p for p in plans if p["bytes"] <= budget - bd.header_reserve(f)]
    best = min(fits, key=lambda p: (p["measured_ppl"], p["bytes"]))
    assert data["chosen"]["choices"] == best["choices"] and "the best measured plan within the budget" in text
    assert plan_layers(Recipe.load(out / "recipe.toml").to_dict()["stages"], 8) == best["choices"]
    for p in plans:
        assert p["measured_ppl"] > 0 and p["predicted_ppl"] > 0
        # the planner's bytes are the footprint's (dense floats as bf16) of the model each plan made, or
        # an upper bound where low-bit GPTQ codes let the footprint find a cheaper mask (pipeline/weight_bytes.py)
        assert 0.97 * p["bytes"] <= p["measured_bytes"] <= p["bytes"], p
    assert data["calibration"]["plans"] == 2 and set(data["calibration"]["multipliers"]) == {"skip", "sparse", "quant"}
    assert (out / "validation" / "sweep.json").is_file()
    Recipe.load(out / "recipe.toml").check_for(8)


def test_a_refitted_choice_is_measured_too_and_the_best_measured_plan_is_kept(
    tiny_model_dir, cache, tmp_path, capsys, data_dir, monkeypatch
):
    from frankenlab.pipeline.planner import validate as val

    def off(measured, delta_of, offset=0.0):  # a fit that makes skipping nearly free: the refit plan differs
        return val.Calibration({"skip": 0.01, "sparse": 1.0, "quant": 1.0}, 1.0, 0.5, len(measured), False)

    monkeypatch.setattr(val, "calibrate", off)
    f = facts(tiny_model_dir)
    budget = bd.header_reserve(f) + bd.embed_bytes(f) + 8 * bd.layer_bytes(f, "2:4/4") + 1000
    out = tmp_path / "refit"
    capsys.readouterr()
    args = ["--budget", str(budget), "--validate", "2", "--eval-windows", "2", "--allow-protected"]
    assert plan(tiny_model_dir, cache, *args, "--out", str(out), "--data-dir", str(data_dir)) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "plan.json").read_text())
    plans = data["validation"]["plans"]
    assert "its plan is measured too" in text and len(plans) == 3 and all(p["status"] == "done" for p in plans)
    assert plans[2]["choices"] == data["calibrated"]["chosen"]["choices"] and "skip" in plans[2]["choices"]
    best = min(
        (p for p in plans if p["bytes"] <= budget - bd.header_reserve(f)), key=lambda p: (p["measured_ppl"], p["bytes"])
    )
    assert data["chosen"]["choices"] == best["choices"], "the plan kept is a measured one, the best within the budget"
    assert plan_layers(Recipe.load(out / "recipe.toml").to_dict()["stages"], 8) == best["choices"]


def test_around_auto_measures_the_uniform_options_in_the_budget_and_plans_around_the_best(
    tiny_model_dir, tmp_path, capsys
):
    import math
    import re

    from frankenlab.pipeline.planner.options import choice_set
    from frankenlab.pipeline.planner.reference import candidates as reference_candidates

    f = facts(tiny_model_dir)
    budget = bd.header_reserve(f) + bd.embed_bytes(f) + 8 * bd.layer_bytes(f, "none/8")
    args = ["plan", "--model", str(tiny_model_dir), "--budget", str(budget), "--method", "rtn"]
    args += [
        "--choices",
        "patterns=none,1:8",
        "bits=16,8",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    ]
    cands = reference_candidates(f, budget, bd.embed_bytes(f), choice_set(["none", "1:8"], [16, 8]), 128)
    assert [c for c, _ in cands] == ["none/8", "1:8/8"]  # what fits, within 90 % of the largest
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    nll = {m[0]: float(m[1]) for m in re.findall(r"every layer at (\S+): .*?, NLL ([0-9.]+) \(ppl", text)}
    assert set(nll) == {"none/8", "1:8/8"}
    data = json.loads((tmp_path / "o" / "plan.json").read_text())
    best = min(nll, key=nll.get)
    assert data["sensitivities"]["around"] == best and f"every layer at {best} (lowest loss)" in text
    ref_nll = data["sensitivities"]["reference_nll"]
    assert ref_nll == pytest.approx(nll[best], abs=1e-4)
    # the reference itself is on the table as a plan: the chosen one is predicted no worse
    assert data["chosen"]["bytes"] <= budget - bd.header_reserve(f)
    assert data["chosen"]["ppl"] <= math.exp(ref_nll) * (1 + 1e-9)
    assert data["front"]["offset"] == pytest.approx(ref_nll - data["sensitivities"]["baseline_nll"])
    # the other candidate, measured uniform, corrects its one-layer deltas for how they compound
    other = ({"none/8", "1:8/8"} - {best}).pop()
    assert other in data["sensitivities"]["corrections"] and f"  {other}: " in text and "interactions:" in text
    # a second run reads every reference and the table from the cache
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "entries read from" in again and "sensitivities  10.0%" not in again
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["chosen"] == data["chosen"]
    # a budget no uniform option fits: the verdict reads the stored table instead of a new pass
    targets = tmp_path / "targets.toml"
    targets.write_text('[targets.mcu]\nweights = "64 KiB"\n')
    nofit = [
        "plan",
        "--model",
        str(tiny_model_dir),
        "--target",
        "mcu",
        "--targets-file",
        str(targets),
        "--method",
        "rtn",
    ]
    assert main([*nofit, "--choices", "patterns=none,1:8", "bits=16,8", "--cache-dir", str(tmp_path / "c")]) == 1
    text = capsys.readouterr().out
    assert f"reference: {best}, whose table is stored" in text and "no plan fits 64.00 KiB" in text
    assert "sensitivities  10.0%" not in text and "entries read from" in text


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
