"""Issue 28's estimates and progress: per-stage duration estimates from cached rates, `sweep --dry-run`
on a huge grid, progress lines from inside sweep nodes (local and through the polled progress file a
Ray task writes), and third-party output of a worker process kept in its log."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from frankenlab.pipeline import estimate as est
from frankenlab.pipeline.recipe import Recipe
from frankenlab.sessions.sweep import NodeFinished, NodeProgress, parse_sweep, run_sweep
from frankenlab.sessions.sweep.jobs import ProgressFile, progress_path, read_progress, run_job


@pytest.fixture
def rate_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FRANKENLAB_CACHE", str(cache))
    monkeypatch.setenv("FRANKENLAB_ESTIMATE", "1")
    return cache


def tiny_recipe(model_dir, stages=None) -> Recipe:
    return Recipe.from_dict(
        {
            "name": "estimate",
            "model": {"source": str(model_dir), "device": "cpu", "dtype": "float32"},
            "calibration": {"samples": 8, "seq_len": 64},
            "evaluation": {"perplexity": ["wikitext2-concat-64"], "ppl_limit": 2, "samples": False},
            "stages": stages
            if stages is not None
            else [
                {"kind": "depth", "k": 2, "metric": "l1"},
                {"kind": "width", "pattern": "2:4"},
                {"kind": "lora", "steps": 8, "seq_len": 32, "batch_size": 2, "dataset": "wiki"},
            ],
        }
    )


# -- estimates ----------------------------------------------------------------------------------
def test_estimate_measures_once_then_reads_the_cache(tiny_model_dir, rate_cache, data_dir):
    recipe = tiny_recipe(tiny_model_dir)
    first = est.estimate_recipe(recipe, data_dir)
    assert [s.kind for s in first.stages] == ["baseline", "depth", "width", "lora"]
    assert all(s.wall > 0 and s.cpu > 0 for s in first.stages)
    assert {"load", "fwd", "lora"} <= set(first.measured) and first.probe_cpu > 0
    lora = first.stages[3]
    assert "8 steps" in lora.parts and "set-up" in lora.parts
    rates = json.loads((rate_cache / est.RATES_FILE).read_text())
    entry = next(iter(rates["entries"].values()))
    assert entry["key"]["threads"] >= 1 and entry["key"]["dtype"] == "float32"
    step = next(v for k, v in entry["rates"].items() if k.startswith("lora:"))["step"]
    # the LoRA stage runs on 6 of the 8 layers (Depth 2): its steps scale by the layers left
    assert lora.parts["8 steps"][1] == pytest.approx(8 * step[1] * 6 / 8)
    again = est.estimate_recipe(recipe, data_dir)
    assert again.measured == [] and again.probe_cpu == 0 and "from the cache" in again.probe_line()
    assert again.cpu == pytest.approx(first.cpu)
    # more steps cost more, from the same rates (no new probe: steps are not part of the rate's key)
    longer = est.estimate_recipe(
        tiny_recipe(
            tiny_model_dir,
            [{"kind": "lora", "steps": 80, "seq_len": 32, "batch_size": 2, "dataset": "wiki", "rank": 4}],
        ),
        data_dir,
    )
    assert longer.measured == [] and longer.stages[1].parts["80 steps"][1] == pytest.approx(80 * step[1])
    # a measured run corrects the next estimate of that kind, a third of the way
    outcome = est.record_outcome(again, {3: [1.0, 2 * lora.cpu]}, again.cache)
    assert outcome["outcome"][3]["measured_cpu"] == 2 * lora.cpu and outcome["outcome"][0]["measured_cpu"] is None
    corrected = est.estimate_recipe(recipe, data_dir)
    assert corrected.stages[3].cpu == pytest.approx(lora.cpu * (1 + 1 / 3))
    assert corrected.stages[2].cpu == pytest.approx(first.stages[2].cpu), "other kinds keep their estimate"


def test_human_durations():
    assert est.human(40) == "about 40 s"
    assert est.human(12 * 60) == "about 12 min"
    assert est.human(6 * 3600) == "about 6.0 h"
    assert est.human(30 * 3600) == "about 30 h"
    assert est.human(3 * 86400) == "about 3.0 days"


def test_run_prints_the_estimate_and_keeps_it_beside_the_measured_times(
    tiny_model_dir, rate_cache, data_dir, tmp_path, capsys
):
    from frankenlab.pipeline.atomic import atomic_write_text
    from frankenlab.sessions import load_session
    from frankenlab.tui.cli.main import main

    path = tmp_path / "r.toml"
    atomic_write_text(
        path,
        tiny_recipe(
            tiny_model_dir, [{"kind": "depth", "k": 1, "metric": "l1"}, {"kind": "width", "pattern": "2:4"}]
        ).dumps(),
    )
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "[0] baseline (load and evaluate): about" in out and "[1] Depth" in out and "[2] Width 2:4" in out
    assert "estimate: about" in out and "in all" in out and "rates measured now" in out
    assert "measured" in out.split("in all", 1)[1]
    session = load_session(tmp_path / "o" / "session.json")
    kept = session.extra["estimate"]
    assert [r["index"] for r in kept["outcome"]] == [0, 1, 2]
    assert all(r["measured_cpu"] > 0 and r["estimated_cpu"] > 0 for r in kept["outcome"])
    # --no-estimate starts at once
    assert main(["run", str(path), "--out", str(tmp_path / "o2"), "--no-estimate", "--data-dir", str(data_dir)]) == 0
    assert "estimate:" not in capsys.readouterr().out


# -- sweep --dry-run on a huge grid ---------------------------------------------------------------
HUGE_AXES = "\n".join(
    f'"lora.{name}" = [{", ".join(values)}]'
    for name, values in (
        ("rank", [str(i) for i in range(1, 11)]),
        ("lr", [f"{i}e-4" for i in range(1, 11)]),
        ("alpha", [f"{i}.0" for i in range(1, 11)]),
        ("seed", [str(i) for i in range(10)]),
        ("steps", [str(i) for i in range(1, 11)]),
    )
)


def grid_text(model_dir, axes: str) -> str:
    return f"""
name = "grid"
[base]
model = {{ source = "{model_dir}", device = "cpu" }}
[base.calibration]
samples = 8
seq_len = 64
[base.evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
[[base.stages]]
kind = "width"
pattern = "2:4"
[[base.stages]]
kind = "lora"
dataset = "wiki"
seq_len = 32
batch_size = 2
steps = 1
[axes]
{axes}
"""


def test_dry_run_of_a_100000_configuration_grid_summarises(tiny_model_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    f = tmp_path / "huge.toml"
    f.write_text(grid_text(tiny_model_dir, HUGE_AXES))
    sweep = parse_sweep(f.read_text())
    assert sweep.size == 100_000 and sweep.node_bound() == 1 + 1 + 100_000
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--dry-run", "--no-estimate"]) == 0
    out = capsys.readouterr().out
    assert "100,000 configuration(s), at most 100,002 node(s)" in out
    assert "lora.rank[10] x lora.lr[10] x lora.alpha[10] x lora.seed[10] x lora.steps[10]" in out
    assert "... 99,980 more" in out and "warning: a big grid (100,000 configurations" in out
    assert len(out.splitlines()) < 60 and not (tmp_path / "o").exists()
    # every axis value was validated: a bad value deep in the grid is found without expanding it
    f.write_text(grid_text(tiny_model_dir, HUGE_AXES.replace('"lora.steps" = [1,', '"lora.steps" = [-3,')))
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--dry-run", "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "sweep error" in err and "lora.steps=-3" in err and "Traceback" not in err


def test_sampled_configurations_are_the_expanded_ones_and_the_bound_is_exact_without_identities(tiny_model_dir):
    sweep = parse_sweep(grid_text(tiny_model_dir, '"width.pattern" = ["1:8", "2:4"]\n"lora.rank" = [4, 8, 16]'))
    everything = sweep.expand()
    picked = sweep.configurations([1, 4, 6])
    assert [c.values for c in picked] == [everything[i - 1].values for i in (1, 4, 6)]
    assert [c.recipe.to_dict() for c in picked] == [everything[i - 1].recipe.to_dict() for i in (1, 4, 6)]
    from frankenlab.sessions.sweep import build_tree

    assert sweep.node_bound() == len(build_tree(everything)[0]) == 1 + 2 + 6
    assert set(sweep.sample_indices(first=2)) == {1, 2, 6, 4, 3}  # the first two, the last, each value once


def test_dry_run_prints_the_grid_estimate_with_shared_prefixes_once(tiny_model_dir, rate_cache, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    f = tmp_path / "g.toml"
    f.write_text(grid_text(tiny_model_dir, '"lora.rank" = [4, 8]'))
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    block = out.split("estimate per node to compute", 1)[1]
    assert block.count("Width 2:4 > LoRA") == 2 and block.count("Width 2:4  ") == 1, block
    assert "estimate: about" in out and "for the grid" in out and "one job at a time" in out


# -- progress from inside sweep nodes ----------------------------------------------------------
def test_local_sweep_shows_progress_lines_in_its_output_and_log(tiny_model_dir, tmp_path, data_dir, capsys):
    from frankenlab.tui.cli.main import main

    f = tmp_path / "two.toml"
    f.write_text(grid_text(tiny_model_dir, "").replace('[[base.stages]]\nkind = "width"\npattern = "2:4"\n', ""))
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    lora = next(i for i, line in enumerate(lines) if line.strip().startswith("start") and "LoRA" in line)
    done = next(i for i, line in enumerate(lines) if line.strip().startswith("done") and "LoRA" in line)
    between = [line for line in lines[lora + 1 : done] if line.strip().startswith("...")]
    assert any("LoRA step 1/1" in line or "perplexity" in line.lower() for line in between), out
    log = (tmp_path / "o" / "sweep.log").read_text()
    assert "start " in log and "progress " in log and "done " in log
    assert any("LoRA" in line for line in log.splitlines() if " progress " in line)


def test_progress_file_is_rate_limited_and_keeps_the_latest():
    from frankenlab.pipeline import events as ev

    path_box = {}

    class Clock:
        now = 100.0

    import frankenlab.sessions.sweep.jobs as jobs

    def fake_monotonic():
        return Clock.now

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path_box["p"] = Path(d) / "p.json"
        heard = []
        pf = ProgressFile(path_box["p"], heard.append, every=1.0)
        real = jobs.time.monotonic
        jobs.time.monotonic = fake_monotonic
        try:
            pf(ev.Progress(1, 0.1, "LoRA step 1/10"))
            first = json.loads(path_box["p"].read_text())
            pf(ev.Progress(1, 0.2, "LoRA step 2/10"))  # too soon: not written
            assert json.loads(path_box["p"].read_text()) == first
            pf(ev.Progress(2, 0.1, "perplexity 1/2"))  # a new stage: written at once
            assert json.loads(path_box["p"].read_text())["stage"] == 2
            Clock.now += 1.5
            pf(ev.Progress(2, 0.5, "perplexity 2/2"))
            got = json.loads(path_box["p"].read_text())
        finally:
            jobs.time.monotonic = real
        assert got["message"] == "perplexity 2/2" and got["seq"] == 3
        assert len(heard) == 4, "the wrapped listener still hears every event"


class PollingExecutor:
    """The Ray executor's shape without Ray: jobs in threads, no listener, events not streamed."""

    name = "polling"
    streams_events = False
    slots = 1

    def __init__(self):
        self.pool = ThreadPoolExecutor(1)
        self.specs = []

    @staticmethod
    def resolve(device, dtype):
        from frankenlab.evals import devices

        return devices.resolved(device, dtype)

    def submit(self, spec, listener=None, cancel=None):
        self.specs.append(spec)
        return self.pool.submit(run_job, spec)

    def cancel(self):
        pass

    def close(self):
        self.pool.shutdown(wait=True)


def test_a_task_that_cannot_stream_reports_progress_through_its_polled_file(tiny_model_dir, tmp_path, data_dir):
    sweep = parse_sweep(grid_text(tiny_model_dir, '"width.pattern" = ["1:8", "2:4"]'))
    events = []
    executor = PollingExecutor()
    record = run_sweep(sweep, tmp_path / "o", executor=executor, listener=events.append, data_dir=data_dir)
    assert record["status"] == "done"
    assert all(s.get("progress_file") for s in executor.specs)
    progressed = {e.key for e in events if isinstance(e, NodeProgress)}
    finished = {e.key for e in events if isinstance(e, NodeFinished) and e.status == "done"}
    assert progressed and progressed <= finished and len(progressed) >= len(executor.specs)
    # the files are gone once their jobs are done; sweep.log has the lines
    assert not list((tmp_path / "o" / "nodes").glob("*.progress.json"))
    assert " progress " in (tmp_path / "o" / "sweep.log").read_text()


def test_read_progress_ignores_a_missing_or_torn_file(tmp_path):
    assert read_progress(tmp_path, "k") is None
    progress_path(tmp_path, "k").parent.mkdir(parents=True)
    progress_path(tmp_path, "k").write_text('{"stage": 1, "frac')
    assert read_progress(tmp_path, "k") is None


# -- third-party output of a worker process ----------------------------------------------------
def test_a_worker_stage_printing_to_stdout_and_stderr_stays_off_the_terminal(tiny_model_dir, tmp_path, capfd):
    from frankenlab.evals.suite import EvalConfig
    from frankenlab.pipeline.recipe import ModelSpec, StageSpec
    from frankenlab.pipeline.runner import run_recipe
    from frankenlab.pipeline.stages import register, unregister
    from tests import child_stage_fake

    register("fake", "tests.child_stage_fake")
    try:
        recipe = Recipe(
            name="noisy",
            model=ModelSpec(source=str(tiny_model_dir), device="cpu", dtype="float32"),
            evaluation=EvalConfig(after="none"),
            stages=[StageSpec("fake", child_stage_fake.Config(behaviour="noisy"))],
        )
        capfd.readouterr()
        result = run_recipe(recipe, tmp_path / "out")
    finally:
        unregister("fake")
    assert result.status == "done", result.message
    seen = capfd.readouterr()
    log = (tmp_path / "out" / "stages" / "01-fake.log").read_text()
    for marker in ("NOISY-STDOUT", "NOISY-STDERR", "NOISY-FD1", "NOISY-TQDM", "NOISY-LOGGING"):
        assert marker not in seen.out and marker not in seen.err, marker
        assert marker in log, marker


def test_third_party_progress_bars_go_to_the_log(tmp_path, capfd):
    from tqdm import tqdm

    from frankenlab.tui.cli.bars import bars_off_log, bars_to_log

    try:
        assert bars_to_log(tmp_path / "run.log")
        for _ in tqdm(range(3), desc="Loading weights"):
            pass
        for _ in tqdm(range(2), desc="to a named file", file=sys.stdout):
            pass
        seen = capfd.readouterr()
        assert "Loading weights" not in seen.err and "Loading weights" in (tmp_path / "run.log").read_text()
        assert "to a named file" in seen.out, "a bar given its own file keeps it"
        bars_to_log(tmp_path / "second.log")  # a second command in the process moves the bars on
        for _ in tqdm(range(1), desc="second bar"):
            pass
        assert "second bar" in (tmp_path / "second.log").read_text()
    finally:
        bars_off_log()
    for _ in tqdm(range(1), desc="back on the terminal"):
        pass
    assert "back on the terminal" in capfd.readouterr().err


# -- the lab's Run pane --------------------------------------------------------------------------
async def test_run_pane_shows_the_estimate_before_the_run():
    from textual.app import App
    from textual.widgets import Static

    from frankenlab.tui.widgets.run_panel import RunLog, RunPanel

    class Host(App):
        def compose(self):
            yield RunPanel()

    stages = [
        est.StageEstimate(0, "baseline", "baseline", 30.0, 50.0),
        est.StageEstimate(1, "lora", "LoRA r8", 5000, 9000),
    ]
    estimate = est.RunEstimate(stages, 12.0, 20.0, ["load", "lora"], "a test CPU")
    async with Host().run_test() as pilot:
        panel = pilot.app.query_one(RunPanel)
        panel.reset("running r: lora -> runs/r")
        panel.show_estimate(estimate)
        await pilot.pause()
        lines = [strip.text for strip in panel.query_one(RunLog).lines]
        assert any("[1] LoRA r8: about 83 min" in line for line in lines), lines
        assert any(line.startswith("estimate: about 84 min in all") for line in lines), lines
        status = str(panel.query_one("#run-status", Static).render())
        assert status == "running r: lora -> runs/r (about 84 min)"


def test_a_damaged_rate_cache_costs_a_probe_never_a_crash(tmp_path):
    from frankenlab.pipeline.rates import RateCache

    path = tmp_path / "rates.json"
    key = {"machine": "m", "model": "x"}
    good = RateCache(key, path)
    good.rates.update({"load": [1.0, 2.0], "shape": {"layers": 2, "hidden": 8}})
    good.save()
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["rates"]["fwd"] = "fast"  # not a number
    entry["rates"]["gen"] = [-1.0, 1.0]  # negative
    entry["corrections"] = ["not", "a", "mapping"]
    path.write_text(json.dumps(data))
    again = RateCache(key, path)
    assert again.rates == {"load": [1.0, 2.0], "shape": {"layers": 2, "hidden": 8}}
    assert again.corrections == {} and again.correction("lora") == 1.0
    data["entries"] = {again.id: ["an", "entry", "that", "is", "a", "list"]}
    path.write_text(json.dumps(data))
    assert RateCache(key, path).rates == {}
    path.write_text("{not json")
    assert RateCache(key, path).rates == {}
