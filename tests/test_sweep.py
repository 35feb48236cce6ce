"""Sweeps on the tiny model: expansion and validation, prefix keys, jobs, resume, tables, Ray."""

import json
import threading
import xml.etree.ElementTree as ET

import pytest

from frankenlab.pipeline import events as ev
from frankenlab.sessions import load_session
from frankenlab.sessions.sweep import (
    NodeFinished,
    SweepError,
    build_tree,
    load_record,
    parse_sweep,
    plan_jobs,
    prefix_key,
    run_sweep,
)
from frankenlab.sessions.sweep.results import pareto_points, sweep_sessions, write_results


def sweep_text(model_dir, axes: str, stages: str = None, extra: str = "") -> str:
    stages = (
        stages
        if stages is not None
        else ('[[base.stages]]\nkind = "depth"\nk = 1\n[[base.stages]]\nkind = "width"\npattern = "1:8"\n')
    )
    return f"""
name = "tiny-sweep"
{extra}
[base]
model = {{ source = "{model_dir}", device = "cpu" }}  # one job at a time, even on a box with several GPUs
[base.calibration]
samples = 8
seq_len = 64
[base.evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
{stages}
[axes]
{axes}
"""


GRID = '"depth.k" = [0, 1]\n"width.pattern" = ["1:8", "2:4"]'


# -- expansion and validation ---------------------------------------------------------------------
def test_axes_expand_in_file_order(tiny_model_dir):
    sw = parse_sweep(
        sweep_text(tiny_model_dir, GRID + '\nquant = ["none", "gptq+eora"]', extra="[defaults.eora]\nrank = 4")
    )
    configs = sw.expand()
    assert len(configs) == 8
    first, last = configs[0], configs[-1]
    assert first.values == {"depth.k": 0, "width.pattern": "1:8", "quant": "none"}
    assert [s.kind for s in first.recipe.stages] == ["width"], "Depth 0 leaves the depth stage out"
    assert [s.kind for s in last.recipe.stages] == ["depth", "width", "gptq", "eora"]
    assert last.recipe.stages[1].config.n == 2 and last.recipe.stages[3].config.rank == 4
    assert len({c.slug for c in configs}) == 8


def test_nested_axis_keys_plan_and_slots(tiny_model_dir):
    stages = (
        '[[base.stages]]\nkind = "width"\npattern = "1:8"\n[[base.stages]]\nslot = "recovery"\n'
        '[[base.stages]]\nkind = "width"\nname = "late"\npattern = "1:8"\n'
    )
    axes = (
        'plan = ["0-3,5,5,6-7", "none"]\nrecovery = ["none", [{ kind = "lora", steps = 2, dataset = "wiki" }]]\n'
        'late.pattern = ["1:8"]'
    )
    configs = parse_sweep(sweep_text(tiny_model_dir, axes, stages)).expand()
    assert len(configs) == 4
    kinds = [[s.kind for s in c.recipe.stages] for c in configs]
    assert kinds == [
        ["depth", "width", "width"],
        ["depth", "width", "lora", "width"],
        ["width", "width"],
        ["width", "lora", "width"],
    ]
    assert configs[0].recipe.stages[0].config.plan == "0-3,5,5,6-7"


@pytest.mark.parametrize(
    "axes, expected",
    [
        ('"width.pattern" = ["1:8", "1:x"]', "configuration 2 (width.pattern=1:x): stage 2 (width): pattern '1:x'"),
        ('"depth.k" = [1, 7]', "configuration 2 (depth.k=7): stage 1 (depth): cannot remove 7 of 8 layers"),
        ('"width.patern" = ["1:8"]', "axis 'width.patern': a width stage has no field 'patern'"),
        ('"lora.rank" = [4]', "axis 'lora.rank': the base recipe has no stage 'lora'"),
        ('quant = ["eora"]', "configuration 1 (quant=eora): stage 3 (eora)"),
        ('"evaluation.ppl_limit" = [-1]', "configuration 1 (evaluation.ppl_limit=-1): evaluation"),
        ('"depth.k" = []', "axis 'depth.k' has no values"),
    ],
)
def test_validation_names_configuration_and_field(tiny_model_dir, axes, expected):
    with pytest.raises(SweepError) as err:
        parse_sweep(sweep_text(tiny_model_dir, axes), "my.toml").expand()
    assert expected in str(err.value) and str(err.value).startswith("my.toml")


# -- prefix keys and jobs -------------------------------------------------------------------------
def test_equal_prefixes_share_and_any_change_does_not(tiny_model_dir):
    configs = parse_sweep(sweep_text(tiny_model_dir, GRID)).expand()
    nodes, chains = build_tree(configs)
    assert len(nodes) == 6  # baseline, W1:8, W2:4, D1, D1>W1:8, D1>W2:4
    assert chains[3][1] == chains[4][1] and nodes[chains[3][1]].configs == [3, 4]
    assert len({chains[c][-1] for c in chains}) == 4
    ident = {"weights": "abc"}
    data = configs[2].recipe.to_dict()
    assert prefix_key(ident, data, 1) == prefix_key(ident, json.loads(json.dumps(data)), 1)
    for change in (
        lambda d: d["stages"][0].update(metric="l1"),
        lambda d: d["calibration"].update(samples=9),
        lambda d: d["evaluation"].update(ppl_limit=3),
    ):
        other = json.loads(json.dumps(data))
        change(other)
        assert prefix_key(ident, other, 1) != prefix_key(ident, data, 1)
    assert prefix_key({"weights": "other"}, data, 1) != prefix_key(ident, data, 1)
    # a later stage's change leaves the earlier prefix's key alone
    other = json.loads(json.dumps(data))
    other["stages"][1]["n"] = 2
    assert prefix_key(ident, other, 1) == prefix_key(ident, data, 1)
    assert prefix_key(ident, other, 2) != prefix_key(ident, data, 2)


def test_quantized_parent_is_computed_inside_its_childs_job(tiny_model_dir):
    configs = parse_sweep(sweep_text(tiny_model_dir, 'quant = ["none", "gptq", "gptq+eora"]')).expand()
    nodes, chains = build_tree(configs)
    gptq, eora = chains[3][-2], chains[3][-1]
    assert chains[2][-1] == gptq, "the GPTQ row and the EoRA row share the GPTQ node"
    jobs = {j.id: j for j in plan_jobs(nodes, set())}
    assert gptq not in jobs and jobs[eora].keys == [gptq, eora]
    width = chains[1][-1]
    assert jobs[eora].start == width and jobs[eora].depends == width
    # once GPTQ is done but EoRA is not, EoRA's job computes GPTQ again from the width model
    jobs = {j.id: j for j in plan_jobs(nodes, set(chains[2]))}
    assert list(jobs) == [eora] and jobs[eora].keys == [gptq, eora]


# -- running, resuming ----------------------------------------------------------------------------
def _computed(record):
    return {n["label"]: n["computed"] for n in record["nodes"].values()}


def test_sweep_runs_each_prefix_once_and_resumes(tiny_model_dir, tmp_path, data_dir):
    sw = parse_sweep(sweep_text(tiny_model_dir, GRID))
    out = tmp_path / "sweep"
    cancel = threading.Event()
    seen = []

    def stop_after_depth(e):  # a crash/Ctrl-C mid-run: stop once the depth-1 node is finished
        seen.append(e)
        if isinstance(e, NodeFinished) and e.label == "Depth 1":
            cancel.set()

    rec = run_sweep(sw, out, listener=stop_after_depth, cancel=cancel, data_dir=data_dir)
    assert rec["status"] == "cancelled"
    # sweep events are events like the runner's: one base, its time stamp and its to_dict
    assert all(isinstance(e, ev.Event) and not isinstance(e, ev.RunEvent) for e in seen)
    assert type(seen[0]).__name__ == "SweepStarted" and type(seen[-1]).__name__ == "SweepFinished"
    depth_done = next(e for e in seen if isinstance(e, NodeFinished) and e.label == "Depth 1")
    assert depth_done.to_dict() == {
        "event": "NodeFinished",
        "time": depth_done.time,
        "key": depth_done.key,
        "label": "Depth 1",
        "status": "done",
        "seconds": depth_done.seconds,
        "message": "",
    }
    assert seen[-1].to_dict()["status"] == "cancelled" and json.dumps([e.to_dict() for e in seen])
    first_done = {k for k, n in rec["nodes"].items() if n["status"] == "done"}
    assert len(first_done) == 4 and len([c for c in rec["configs"] if c["status"] == "done"]) == 2
    rec = run_sweep(sw, out, data_dir=data_dir)
    assert rec["status"] == "done"
    assert rec["runs"][-1]["nodes_computed"] == 2 and rec["runs"][-1]["nodes_reused"] == 4
    assert set(_computed(rec).values()) == {1}, "every node computed exactly once over both runs"
    depth = next(n for n in rec["nodes"].values() if n["label"] == "Depth 1")
    assert depth["shared_by"] == 2 and rec["cache_hits"]["shared"] == 4
    record, sessions = sweep_sessions(out)
    assert len(sessions) == 4 and all(s.status == "done" for s in sessions)
    d1w24 = sessions[3]
    assert [s.kind for s in d1w24.stages] == ["baseline", "depth", "width"]
    assert d1w24.stages[2].num_layers == 7 and d1w24.artifact_path(2) is not None
    assert d1w24.stages[1].extra["sweep_node"] == record["configs"][3]["nodes"][1]
    # a rerun runs nothing
    rec = run_sweep(sw, out, data_dir=data_dir)
    assert rec["runs"][-1]["jobs"] == 0 and rec["runs"][-1]["nodes_computed"] == 0
    # a node whose job was killed before it wrote node.json is done again, and only it
    leaf = record["configs"][0]["nodes"][-1]
    (out / "nodes" / leaf / "node.json").unlink()
    (out / record["configs"][0]["session"]).unlink()
    stale = load_record(out)  # as a kill -9 leaves it: the last run never finished
    stale["runs"][-1]["status"] = "running"
    (out / "sweep.json").write_text(json.dumps(stale))
    rec = run_sweep(sw, out, data_dir=data_dir)
    assert rec["runs"][-1]["nodes_computed"] == 1 and rec["nodes"][leaf]["computed"] == 2
    assert [r["status"] for r in rec["runs"]] == ["cancelled", "done", "interrupted", "done"]
    assert load_session(out / record["configs"][0]["session"]).status == "done"


def test_tables_in_every_format_and_pareto_figure(tiny_model_dir, tmp_path, data_dir):
    sw = parse_sweep(
        sweep_text(
            tiny_model_dir,
            '"width.pattern" = ["1:8", "2:4"]\nrecovery = ["none", '
            '[{ kind = "lora", steps = 1, dataset = "wiki", seq_len = 32, batch_size = 2 }]]',
        )
    )
    out = tmp_path / "sweep"
    assert run_sweep(sw, out, data_dir=data_dir)["status"] == "done"
    written = write_results(out)
    assert set(written) == {"table-4.1", "table-4.2", "pareto"}
    t41 = (out / "tables" / "table-4.1.md").read_text()
    assert t41.splitlines()[0].startswith("| Config | TriviaQA closed") and "PPL [wikitext2-concat-64:first2]" in t41
    assert "Width 2:4" in t41 and "LoRA" not in t41.splitlines()[0]
    rows = json.loads((out / "tables" / "table-4.2.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0]["LoRA type"].startswith("LoRA") and rows[0]["Quantization"] is None
    csv = (out / "tables" / "table-4.1.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].split(",")[0] == "Config"
    tex = (out / "tables" / "table-4.2.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\toprule" in tex and tex.count("\\\\") == 3
    assert written["pareto"] == [str(out / "tables" / f"pareto.{ext}") for ext in ("svg", "png", "json")]
    svg = ET.parse(out / "tables" / "pareto.svg").getroot()  # matplotlib's, text kept as text
    words = " ".join(t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text"))
    assert "PPL [wikitext2-concat-64:first2] (lower is better)" in words
    assert (out / "tables" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "tables" / "pareto.json").read_text())["points"]) == 4
    points, title, lower = pareto_points(sweep_sessions(out)[1])
    assert lower and title.startswith("PPL") and any(p.front for p in points)
    smallest = min(points, key=lambda p: (p.bytes, p.quality))
    assert smallest.front, "the best of the smallest configurations is always on the front"
    best = min(points, key=lambda p: p.quality)
    assert best.front and sum(p.front for p in points) <= len(points)


def test_cli_dry_run_and_bad_sweep(tiny_model_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    f = tmp_path / "s.toml"
    f.write_text(sweep_text(tiny_model_dir, GRID))
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 configuration(s), 6 node(s)" in text and "Depth 1  used by 2 configurations" in text
    assert not (tmp_path / "o" / "sweep.json").exists()
    f.write_text(sweep_text(tiny_model_dir, '"width.pattern" = ["3:x"]'))
    assert main(["sweep", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "sweep error" in err and "configuration 1" in err and "Traceback" not in err


def test_ray_gives_the_local_numbers(tiny_model_dir, tmp_path, data_dir):
    import ray  # a hard dependency: a broken install fails here instead of skipping

    from frankenlab.sessions.sweep import RayExecutor

    sw = parse_sweep(sweep_text(tiny_model_dir, '"width.pattern" = ["1:8", "2:4"]'))
    run_sweep(sw, tmp_path / "local", data_dir=data_dir)
    executor = RayExecutor(num_cpus=2)
    seen = []
    try:
        remote = run_sweep(sw, tmp_path / "ray", executor=executor, data_dir=data_dir, listener=seen.append)
    finally:
        executor.close()
    assert not ray.is_initialized()
    assert remote["status"] == "done" and remote["runs"][-1]["executor"] == "ray"
    # progress from inside the Ray tasks reached the sweep (their polled progress files), for every job
    from frankenlab.sessions.sweep import NodeProgress

    progressed = {e.key for e in seen if isinstance(e, NodeProgress)}
    assert len(progressed) >= remote["runs"][-1]["jobs"] and progressed <= set(remote["nodes"])
    assert remote["runs"][-1]["nodes_computed"] == len(remote["nodes"]) == 4
    a, b = sweep_sessions(tmp_path / "local")[1], sweep_sessions(tmp_path / "ray")[1]
    for sa, sb in zip(a, b, strict=False):
        ma, mb = sa.final_stage().metric("perplexity"), sb.final_stage().metric("perplexity")
        assert ma["protocol"] == mb["protocol"] and ma["value"] == pytest.approx(mb["value"], rel=1e-4)
        assert sa.final_stage().params_nonzero == sb.final_stage().params_nonzero
