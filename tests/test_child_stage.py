"""Stages in a worker process (pipeline.child_stage): voice, hand-over, failures, cancel.

The stage is tests/child_stage_fake.py (RUNS_IN_CHILD, misbehaving on request), so these tests need
no gptqmodel; the real gptq stage in a child is tested in tests/test_quant.py and the lab's Pilot test.
Each test starts one worker process (a few seconds of imports).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from frankenlab.pipeline import child_stage
from frankenlab.pipeline import events as ev
from frankenlab.pipeline.runner import run_recipe


@pytest.fixture(autouse=True)
def fake_kind():
    from frankenlab.pipeline.stages import register, unregister

    register("fake", "tests.child_stage_fake")
    yield
    unregister("fake")


def recipe(model_dir, *stages):
    from frankenlab.evals.suite import EvalConfig
    from frankenlab.pipeline.recipe import ModelSpec, Recipe, StageSpec
    from tests import child_stage_fake

    specs = []
    for s in stages:
        if s == "depth":
            from frankenlab.pipeline.stages import depth

            specs.append(StageSpec("depth", depth.Config(k=1, metric="l1")))
        else:
            specs.append(StageSpec("fake", child_stage_fake.Config(behaviour=s)))
    return Recipe(
        name="child",
        model=ModelSpec(source=str(model_dir), device="cpu", dtype="float32"),
        evaluation=EvalConfig(after="none"),
        stages=specs,
    )


def embeddings(model_dir) -> torch.Tensor:
    from frankenlab.pipeline.loading import load_model

    return load_model(str(model_dir), device="cpu", dtype="float32").model.get_input_embeddings().weight.detach()


def test_stage_runs_in_a_worker_and_its_voice_reaches_the_listeners(tiny_model_dir, tmp_path):
    events = []
    result = run_recipe(recipe(tiny_model_dir, "ok"), tmp_path / "out", listener=events.append)
    assert result.status == "done", result.message
    record = result.records[-1]
    assert record.report["pid"] != os.getpid()  # it ran elsewhere
    assert Path(record.report["input"]) == Path(tiny_model_dir).resolve()  # it read the run model's folder
    # what the stage said in the worker arrived here, as events of stage 1
    assert any(isinstance(e, ev.Progress) and e.stage == 1 and e.message.startswith("pid ") for e in events)
    assert any(isinstance(e, ev.LogLine) and e.stage == 1 and "child stage ok" in e.message for e in events)
    metric = next(e for e in events if isinstance(e, ev.MetricMeasured) and e.name == "fake_metric")
    assert (metric.stage, metric.value, metric.protocol) == (1, 1.5, "fake-protocol")
    # the parent continues with the model the worker saved
    assert torch.equal(result.model.get_input_embeddings().weight, 2 * embeddings(tiny_model_dir))
    assert record.artifact == str(tmp_path / "out" / "stages" / "01-fake")
    assert (tmp_path / "out" / "stages" / "01-fake.log").is_file()


def test_without_a_saved_folder_the_model_is_handed_over_saved(tiny_model_dir, tmp_path):
    """--no-save-models: the depth-pruned model exists only in memory; the worker gets it saved for it
    (safetensors, no pickle) in a hidden folder that is removed afterwards."""
    result = run_recipe(recipe(tiny_model_dir, "depth", "ok"), tmp_path / "out", save_models=False)
    assert result.status == "done", result.message
    assert result.records[-1].report["input"] == "None"
    assert len(result.model.model.layers) == 7  # the pruned model, not the folder it came from
    assert not list((tmp_path / "out" / "stages").glob(".*input"))  # the hand-over folder is removed


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("exit", "exited with code 1 without a result: ValueError: boom inside a worker thread"),
        ("abort", "was killed by SIGABRT"),
        ("raise", "failed in its worker process: RuntimeError: the fake stage broke"),
    ],
)
def test_a_worker_that_dies_or_raises_fails_the_run_in_one_line(tiny_model_dir, tmp_path, behaviour, reason):
    events = []
    out = tmp_path / "out"
    result = run_recipe(recipe(tiny_model_dir, behaviour), out, listener=events.append)
    assert result.status == "failed"
    log = out / "stages" / "01-fake.log"
    assert reason in result.message and f"(log: {log})" in result.message and "\n" not in result.message
    assert log.is_file() and not (out / "stages" / "01-fake").exists()  # no half-written folder
    failed = next(e for e in events if isinstance(e, ev.RunFailed))
    assert failed.stage == 1 and failed.cause == ""
    assert not any(isinstance(e, ev.LogLine) and e.level == "error" for e in events)  # no traceback in the run
    if behaviour == "exit":
        assert "Traceback" in log.read_text()


def test_out_of_memory_in_the_worker_is_one_line_that_says_what_to_lower(tiny_model_dir, tmp_path):
    events = []
    result = run_recipe(recipe(tiny_model_dir, "oom"), tmp_path / "out", listener=events.append)
    assert result.status == "failed" and "\n" not in result.message
    assert result.message.startswith("out of GPU memory in the fake stage: lower samples")
    assert "finished stages are kept" in result.message
    assert not any(isinstance(e, ev.LogLine) and e.level == "error" for e in events)  # no traceback in the run
    from frankenlab.pipeline.child_stage import _failure

    outcome = {"asked_cancel": False, "event": "error", "type": "OutOfMemoryError", "message": "CUDA out of memory"}
    for kind, lower in (("gptq", "lower samples (calibration sequences) or seq_len"), ("eora", "seq_len or rank")):
        exc = _failure(kind, outcome, tmp_path / "x.log")
        assert isinstance(exc, torch.OutOfMemoryError) and f"in the {kind} stage: " in str(exc) and lower in str(exc)


def test_a_refusal_in_the_worker_is_an_input_error(tiny_model_dir, tmp_path):
    events = []
    result = run_recipe(recipe(tiny_model_dir, "refuse"), tmp_path / "out", listener=events.append)
    assert result.status == "failed" and result.message == "the fake stage refuses this model: choose another"
    assert next(e for e in events if isinstance(e, ev.RunFailed)).cause == "input"


@pytest.mark.parametrize("behaviour", ["wait", "deaf"])
def test_cancel_asks_the_worker_then_ends_it(tiny_model_dir, tmp_path, monkeypatch, behaviour):
    """A worker that checks the cancel flag stops by itself; one that does not is ended after the grace."""
    monkeypatch.setattr(child_stage, "CANCEL_GRACE_S", 1.0)
    cancel, pids = threading.Event(), []

    def listener(e):
        if isinstance(e, ev.Progress) and e.stage == 1 and e.message.startswith("pid "):
            pids.append(int(e.message.split()[1]))
            cancel.set()

    out = tmp_path / "out"
    result = run_recipe(recipe(tiny_model_dir, behaviour), out, listener=listener, cancel=cancel)
    assert result.status == "cancelled" and pids
    assert not (out / "stages" / "01-fake").exists()  # the half-written folder is removed
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # the worker is gone


def test_the_registry_says_which_kinds_run_in_a_worker():
    from frankenlab.pipeline.stages import stage_kind, stage_names

    assert {k for k in stage_names() if stage_kind(k).runs_in_child} == {"gptq", "eora", "fake"}


def test_an_unmerged_adapter_is_handed_over_merged_as_safetensors(tiny_model_dir, tmp_path):
    """A model with an unmerged LoRA adapter has no folder that opens as it: the parent merges it
    (pruning zeros kept, as the gptq stage would) and saves it with save_pretrained; no pickle."""
    from types import SimpleNamespace

    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.lora_adapters import _peft

    LoraConfig, get_peft_model = _peft()  # peft, usable beside gptqmodel without optimum

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    q = lm.model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q[:, ::2] = 0  # a pruned pattern the merge must keep
    q_before = q.detach().clone()
    peft_model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    logs = []
    ctx = SimpleNamespace(input_artifact=tiny_model_dir, tokenizer=lm.tokenizer, log=logs.append)
    given = child_stage._hand_over(peft_model, ctx, tmp_path / ".01-gptq.input")
    assert given == {"folder": str(tmp_path / ".01-gptq.input"), "spare": True}
    files = {p.name for p in (tmp_path / ".01-gptq.input").iterdir()}
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))]
    saved = load_model(given["folder"], device="cpu", dtype="float32").model
    q_saved = saved.model.layers[0].self_attn.q_proj.weight
    assert torch.all(q_saved[:, ::2] == 0) and bool((q_saved[:, 1::2] != 0).any())
    assert not torch.equal(q_saved, q_before)  # the adapter's change is in the merged weights
    assert logs and "merged before the worker starts" in logs[0]
