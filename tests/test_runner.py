import json
import subprocess
import sys
import threading
from pathlib import Path

from transformers import AutoModelForCausalLM

from frankenlab.pipeline import events as ev
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.stages.width import satisfies_nm
from frankenlab.sessions import record_run


def tiny_recipe(model_dir, stages: str, ppl="wikitext2-concat-64") -> Recipe:
    return Recipe.loads(f"""
name = "tiny"
model = "{model_dir}"
[calibration]
samples = 8
seq_len = 64
[evaluation]
perplexity = ["{ppl}"]
ppl_limit = 4
samples = false
{stages}
""")


DEPTH_WIDTH = """
[[stages]]
kind = "depth"
k = 2
[[stages]]
kind = "width"
pattern = "2:4"
"""


def test_run_writes_session_and_models(tiny_model_dir, tmp_path, data_dir):
    seen = []
    session = record_run(tiny_recipe(tiny_model_dir, DEPTH_WIDTH), tmp_path, listener=seen.append, data_dir=data_dir)
    assert session.status == "done"
    kinds = [type(e).__name__ for e in seen]
    assert kinds.count("StageStarted") == 3 and kinds.count("StageFinished") == 3 and kinds[-1] == "RunFinished"
    assert any(isinstance(e, ev.Progress) and 0 < e.fraction <= 1 for e in seen)
    saved = json.loads((tmp_path / "session.json").read_text())
    assert [s["kind"] for s in saved["stages"]] == ["baseline", "depth", "width"]
    for s in saved["stages"]:
        assert s["status"] == "done" and s["seconds"] > 0 and s["params_count"] > 0
        assert s["metrics"][0]["protocol"] == "wikitext2-concat-64:first4"
    assert saved["stages"][1]["num_layers"] == 6 and saved["stages"][2]["params"]["pattern"] == "2:4"
    assert saved["stages"][2]["params_nonzero"] < saved["stages"][1]["params_nonzero"]
    model = AutoModelForCausalLM.from_pretrained(saved["stages"][2]["artifact"])
    assert model.config.num_hidden_layers == 6
    assert all(satisfies_nm(layer.mlp.up_proj.weight, 2, 4) for layer in model.model.layers)


def test_failing_stage_keeps_finished_stages(tiny_model_dir, tmp_path, data_dir, monkeypatch):
    # the preflight would refuse 1:48 before loading (tests/test_strict_inputs.py): let it reach the stage
    monkeypatch.setattr("frankenlab.pipeline.stages.width.check_config", lambda config, model_config: None)
    stages = '[[stages]]\nkind = "depth"\nk = 1\n[[stages]]\nkind = "width"\npattern = "1:48"'
    session = record_run(tiny_recipe(tiny_model_dir, stages), tmp_path, data_dir=data_dir)
    saved = json.loads((tmp_path / "session.json").read_text())
    assert session.status == saved["status"] == "failed"
    assert [s["status"] for s in saved["stages"]] == ["done", "done", "failed"]
    assert "not a multiple of M=48" in saved["stages"][2]["error"]
    assert saved["stages"][1]["metrics"], "measurements of finished stages are kept"


def test_cancel_between_batches(tiny_model_dir, tmp_path, data_dir):
    cancel = threading.Event()
    seen = []

    def listener(e):
        seen.append(e)
        if isinstance(e, ev.StageStarted) and e.kind == "width":
            cancel.set()

    session = record_run(
        tiny_recipe(tiny_model_dir, DEPTH_WIDTH), tmp_path, listener=listener, cancel=cancel, data_dir=data_dir
    )
    saved = json.loads((tmp_path / "session.json").read_text())
    assert session.status == "cancelled"
    assert [s["status"] for s in saved["stages"]] == ["done", "done", "cancelled"]
    # a cancel is its own event, not a failure: RunCancelled(stage 2), then RunFinished("cancelled")
    assert not any(isinstance(e, ev.RunFailed) for e in seen)
    assert [(type(e).__name__, e.stage) for e in seen[-2:]] == [("RunCancelled", 2), ("RunFinished", 2)]
    assert seen[-1].status == "cancelled" and saved["stages"][2]["error"] == seen[-2].message
    assert [e["event"] for e in saved["events"][-2:]] == ["RunCancelled", "RunFinished"]


def test_missing_data_fails_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FRANKENLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = []
    session = record_run(
        tiny_recipe(tiny_model_dir, DEPTH_WIDTH), tmp_path / "out", listener=seen.append, data_dir=tmp_path / "empty"
    )
    assert session.status == "failed"
    err = session.stages[0].error
    assert (
        "c4/c4-en-train-first1000.jsonl" in err
        and "data directory" in err
        and "explicit file path" in err
        and "hub" in err
    )
    assert not any(isinstance(e, ev.StageStarted) for e in seen)


def test_recipe_toml_is_written_atomically(tiny_model_dir, tmp_path, monkeypatch):
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.atomic import atomic_write_text

    written = []

    def spy(path, text, *args, **kwargs):
        written.append(Path(path))
        atomic_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(runner, "atomic_write_text", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.toml").write_text("an older run's recipe")
    recipe = tiny_recipe(tiny_model_dir, DEPTH_WIDTH)
    result = runner.run_recipe(recipe, out, data_dir=tmp_path / "empty")  # fails on the data, after the recipe
    assert result.status == "failed"
    assert written == [out / "recipe.toml"]
    assert Recipe.load(out / "recipe.toml").to_dict() == recipe.to_dict()


def test_recipe_checked_against_model_depth_before_loading(tiny_model_dir, tmp_path, data_dir):
    session = record_run(tiny_recipe(tiny_model_dir, '[[stages]]\nkind = "depth"\nk = 5'), tmp_path, data_dir=data_dir)
    assert session.status == "failed"
    # the refusal belongs to the refusing stage (issue 14): the baseline did not fail, it never ran
    assert "cannot remove 5 of 8 layers: 6 are protected" in session.stages[1].error
    assert session.stages[1].status == "failed"
    assert session.stages[0].status == "skipped" and session.stages[0].error is None


def test_cli_run_headless(tiny_model_dir, tmp_path, data_dir):
    recipe = tiny_recipe(tiny_model_dir, DEPTH_WIDTH)
    recipe.save(tmp_path / "r.toml")
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
    assert out.returncode == 0, out.stdout + out.stderr
    assert "perplexity" in out.stdout and "wikitext2-concat-64:first4" in out.stdout
    assert json.loads((tmp_path / "o" / "session.json").read_text())["status"] == "done"


def test_cli_bad_recipe_message(tmp_path):
    (tmp_path / "bad.toml").write_text('[[stages]]\nkind = "width"\npattern = "4:2"\n')
    out = subprocess.run(
        [sys.executable, "-m", "frankenlab.tui", "run", str(tmp_path / "bad.toml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "N must be smaller than M" in out.stdout
