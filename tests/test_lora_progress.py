"""Issue 28, knowing when to stop and never starting over: validation on held-out training windows,
steps = "auto" (plateau with a cap), the curve in the report and the lab, checkpoints that a
cancelled or killed LoRA stage resumes from (in the same folder, or through replay --from-stage),
and the remaining time during training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.config import config_fields, from_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import events as ev
from frankenlab.pipeline import lora_progress
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.stages import lora
from tests.tiny import TRAIN_TEXT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "repeated.txt"
    p.write_text((TRAIN_TEXT.replace("\n", " ") + "\n") * 8)
    return p


def ctx_for(lm, work, listener=ev.ignore, **kw):
    return StageContext(lm.tokenizer, torch.device("cpu"), work_dir=work, listener=listener, **kw)


def quick(text_file, **kw):
    base = dict(dataset=str(text_file), steps=8, batch_size=4, seq_len=32, lr=3e-2, dropout=0.0, seed=0)
    return lora.Config(**{**base, **kw})


def fresh(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def logs_of(seen):
    return [e.message for e in seen if isinstance(e, ev.LogLine)]


# -- the stop decision: a pure function of the validation curve ---------------------------------------
PLATEAU = [(0, 3.0), (2, 2.5), (4, 2.49), (6, 2.489), (8, 2.49), (10, 2.488)]
IMPROVING = [(2 * i, 3.0 * 0.97**i) for i in range(30)]


def test_plateau_stops_a_flat_curve_and_never_an_improving_one():
    stops = [k for k in range(1, len(PLATEAU) + 1) if lora_progress.plateau(PLATEAU[:k], patience=3, min_delta=0.005)]
    assert stops and stops[0] == 5, "three validations after 2.5 without 0.5 % below it: stop at the fifth point"
    why = lora_progress.plateau(PLATEAU[:5], patience=3, min_delta=0.005)
    assert why.startswith("plateau: no validation loss 0.5 % below 2.5 in the last 3 validations")
    assert not any(lora_progress.plateau(IMPROVING[:k], patience=3, min_delta=0.005) for k in range(1, 31))
    # small gains add up against the best that counted: 0.3 % a time is an improvement every other time
    creeping = [(i, 3.0 * 0.997**i) for i in range(30)]
    assert not any(lora_progress.plateau(creeping[:k], patience=2, min_delta=0.005) for k in range(1, 31))
    assert lora_progress.plateau(creeping[:10], patience=1, min_delta=0.005)  # a stricter patience stops it


@pytest.mark.parametrize(
    "curve, steps, reason",
    [
        ([3.0, 2.5, 2.499, 2.498, 2.2, 2.0, 1.8], 6, "plateau"),  # flat after step 2: stops at 6 of at most 12
        ([3.0 * 0.9**k for k in range(7)], 12, "cap"),  # keeps improving: runs to the cap
    ],
)
def test_auto_stops_early_only_on_a_plateau(tiny, tmp_path, text_file, monkeypatch, curve, steps, reason):
    scripted = iter(curve)
    held = []

    def val_loss(model, val, micro, device, amp=None, cancelled=lambda: False):
        held.append(val)
        return next(scripted)

    monkeypatch.setattr(lora_progress, "validation_loss", val_loss)
    seen = []
    cfg = quick(text_file, steps="auto", max_steps=12, eval_every=2, patience=2, min_delta=0.005)
    res = lora.run(tiny.model, ctx_for(tiny, tmp_path / "stage", seen.append), cfg)
    r = res.report
    assert r["steps"] == steps and r["stop"]["cap"] == 12 and r["stop"]["reason"].startswith(reason)
    assert [s for s, _ in r["val_curve"]] == list(range(0, steps + 1, 2))
    assert [v for _, v in r["val_curve"]] == pytest.approx(curve[: steps // 2 + 1])
    vals = [(e.step, e.value) for e in seen if isinstance(e, ev.MetricMeasured) and e.name == "lora_val_loss"]
    assert vals == [tuple(p) for p in r["val_curve"]]
    assert len([e for e in seen if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss"]) == steps
    text = lora_progress.curve_text(r)
    assert text.startswith("val loss ") and f"{curve[0]:.2f} -> " in text
    assert (f"(stopped at {steps}/12: plateau)" if reason == "plateau" else "(ran to the cap 12/12") in text
    # the held-out windows are the last 16 of the packed training text, and not trained on
    windows, _ = lora.training_windows(tiny.tokenizer, cfg, None, needed=12 * 4 + 16)
    assert r["val_windows"] == 16 and torch.equal(held[0], windows[-16:])
    assert any("the last 16 held out for validation" in m for m in logs_of(seen))
    assert not (tmp_path / "stage" / "checkpoint").exists(), "a finished stage leaves no checkpoint"


def test_held_out_slice_is_deterministic_and_at_most_a_quarter():
    w = torch.arange(40 * 3).view(40, 3)
    train, val = lora_progress.split_windows(w, 16)
    assert train.shape[0] == 30 and val.shape[0] == 10 and torch.equal(val, w[30:])  # a quarter of 40
    train, val = lora_progress.split_windows(w, 4)
    assert torch.equal(train, w[:36]) and torch.equal(val, w[36:])
    train, val = lora_progress.split_windows(w[:3], 4)
    assert train.shape[0] == 3 and val.shape[0] == 0  # too few to hold any out


def test_validation_loss_is_the_eval_mode_mean_and_cancellable(tiny):
    ids = torch.randint(0, 100, (5, 16))
    tiny.model.train()
    got = lora_progress.validation_loss(tiny.model, ids, 2, "cpu")
    assert tiny.model.training, "train mode is restored"
    tiny.model.eval()
    with torch.no_grad():
        want = sum(float(tiny.model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss) for i in range(5)) / 5
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(Cancelled):
        lora_progress.validation_loss(tiny.model, ids, 2, "cpu", cancelled=lambda: True)


def test_steps_auto_in_config_form_recipe_and_sweep(tiny_model_dir):
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.sweep.spec import parse_sweep
    from frankenlab.tui.widgets.form_fields import parse_text
    from tests.test_sweep import sweep_text

    cfg = from_dict(lora.Config, {"steps": "auto", "max_steps": 40}, "stage 1 (lora)")
    assert cfg.steps == "auto" and cfg.total_steps == 40
    assert from_dict(lora.Config, {"steps": "auto"}, "x").total_steps == 1024  # the cap from samples
    for bad, message in [
        ({"steps": "Auto"}, "stage 1 (lora).steps: expected a whole number or \"auto\", got 'Auto'"),
        ({"steps": "auto", "eval_every": 0}, 'steps = "auto" stops on the validation loss'),
        ({"steps": 0}, 'steps must be at least 1 (or "auto")'),
        ({"patience": 0}, "patience must be at least 1"),
    ]:
        with pytest.raises(RecipeError) as err:
            from_dict(lora.Config, bad, "stage 1 (lora)")
        assert message in str(err.value)
    info = next(f for f in config_fields(lora.Config) if f.name == "steps")
    assert info.form and info.base is int and info.optional and info.words == ("auto",)
    assert parse_text(info, "auto") == "auto" and parse_text(info, " 12 ") == 12 and parse_text(info, "") is None
    with pytest.raises(RecipeError, match='expected a whole number or "auto"'):
        parse_text(info, "soon")
    recipe = Recipe.loads(
        f'name = "r"\nmodel = "{tiny_model_dir}"\n[[stages]]\nkind = "lora"\nsteps = "auto"\nmax_steps = 64\n'
    )
    again = Recipe.loads(recipe.dumps())
    assert again.stages[0].config.steps == "auto" and again.stages[0].config.max_steps == 64
    stages = '[[base.stages]]\nkind = "lora"\ndataset = "wiki"\n'
    configs = parse_sweep(sweep_text(tiny_model_dir, '"lora.steps" = [8, "auto"]', stages)).expand()
    assert [c.recipe.stages[0].config.steps for c in configs] == [8, "auto"]


def test_reference_page_names_the_auto_word():
    from tests.test_docs import load_generator

    type_name = load_generator().type_name
    info = next(f for f in config_fields(lora.Config) if f.name == "steps")
    assert type_name(info.type) == 'int or "auto" or empty'


# -- remaining time -----------------------------------------------------------------------------------
def test_remaining_time_from_measured_steps(tiny, tmp_path, text_file, monkeypatch):
    assert lora_progress.fmt_duration(40) == "40 s" and lora_progress.fmt_duration(12 * 60) == "12 min"
    assert lora_progress.fmt_duration(6 * 3600) == "6.0 h"
    clock = lora_progress.StepClock()
    clock.first, clock.steps = clock.t0 + 5.0, 1  # one step of 5 s measured
    assert clock.left(1, 145) == "about 12 min left" and clock.left(145, 145) == ""
    assert clock.left(1, 145, at_most=True) == "at most about 12 min left"
    seen = []
    lora.run(tiny.model, ctx_for(tiny, tmp_path / "s", seen.append), quick(text_file, steps=4, eval_every=2))
    lines = [e.message for e in seen if isinstance(e, ev.Progress) and e.message.startswith("LoRA step")]
    assert len(lines) == 4 and all(" left" in m for m in lines[:3]) and "about" in lines[0]
    assert "left" not in lines[-1]
    assert any(m.startswith("lora: step 2/4, val loss ") and m.endswith(" left") for m in logs_of(seen))


# -- checkpoints ----------------------------------------------------------------------------------------
def _cancel_after(step: int, cancel: threading.Event):
    def listener(e):
        listener.seen.append(e)
        if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss" and e.step == step:
            cancel.set()

    listener.seen = []
    return listener


def test_cancelled_stage_resumes_from_its_checkpoint_as_if_never_stopped(tiny_model_dir, tmp_path, text_file):
    """Dropout on: the RNG state travels with the checkpoint, so the resumed adapter and losses equal
    an uninterrupted run's."""
    cfg = quick(text_file, steps=8, dropout=0.1, checkpoint_every=3, eval_every=2)
    whole = lora.run(fresh(tiny_model_dir).model, ctx_for(fresh(tiny_model_dir), tmp_path / "whole"), cfg)

    lm, work, cancel = fresh(tiny_model_dir), tmp_path / "cut", threading.Event()
    listener = _cancel_after(5, cancel)
    with pytest.raises(Cancelled):
        lora.run(lm.model, ctx_for(lm, work, listener, cancel_event=cancel), cfg)
    saved = torch.load(work / "checkpoint" / "state.pt", weights_only=True)
    assert saved["step"] == 5 and saved["cursor"] == 20 and len(saved["losses"]) == 5
    assert any("checkpoint at step 5 saved" in m for m in logs_of(listener.seen))

    lm, seen = fresh(tiny_model_dir), []
    res = lora.run(lm.model, ctx_for(lm, work, seen.append), cfg)
    assert any("resuming from the checkpoint at step 5/8" in m for m in logs_of(seen))
    steps_run = [e.step for e in seen if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss"]
    assert steps_run == [6, 7, 8], "continues at the checkpoint's step, not at 0"
    r, w = res.report, whole.report
    assert r["resumed_from"] == 5 and r["steps"] == 8 and r["samples"] == w["samples"]
    assert r["loss_curve"] == pytest.approx(w["loss_curve"], rel=1e-5)
    assert [s for s, _ in r["val_curve"]] == [s for s, _ in w["val_curve"]] == [0, 2, 4, 6, 8]
    assert [v for _, v in r["val_curve"]] == pytest.approx([v for _, v in w["val_curve"]], rel=1e-5)
    for (name, a), b in zip(whole.model.named_parameters(), res.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not (work / "checkpoint").exists()
    assert "[resumed at step 5]" in lora_progress.curve_text(r)


def test_checkpoint_of_another_config_or_a_damaged_one_is_refused_with_a_line(tiny_model_dir, tmp_path, text_file):
    cfg = quick(text_file, steps=4, checkpoint_every=2, eval_every=0)
    lm, work, cancel = fresh(tiny_model_dir), tmp_path / "w", threading.Event()
    with pytest.raises(Cancelled):
        lora.run(lm.model, ctx_for(lm, work, _cancel_after(3, cancel), cancel_event=cancel), cfg)
    ckpt = work / "checkpoint" / "state.pt"
    before = ckpt.read_bytes()

    def put_back(data: bytes) -> None:  # a finished run removes its checkpoint: each case gets it again
        ckpt.parent.mkdir(exist_ok=True)
        ckpt.write_bytes(data)

    for other, said in [
        ({"rank": 4}, "rank 8 then, 4 now"),
        ({"seed": 1}, "seed 0 then, 1 now"),
        ({"seq_len": 24}, "other training windows"),
    ]:
        lm, seen = fresh(tiny_model_dir), []
        put_back(before)
        res = lora.run(lm.model, ctx_for(lm, work, seen.append), quick(text_file, **{**cfg.__dict__, **other}))
        refusals = [m for m in logs_of(seen) if "is from a different run" in m]
        assert len(refusals) == 1 and said in refusals[0] and "\n" not in refusals[0], logs_of(seen)
        assert "starting from step 0" in refusals[0]
        assert res.report["resumed_from"] is None and res.report["steps"] == 4
    # another input model (here: pruned) is another run too
    lm, seen = fresh(tiny_model_dir), []
    put_back(before)
    with torch.no_grad():
        lm.model.model.layers[0].self_attn.q_proj.weight[0, :4] = 0.0
    lora.run(lm.model, ctx_for(lm, work, seen.append), cfg)
    assert any("other input weights" in m for m in logs_of(seen))
    # a damaged file: refused, never half-loaded
    lm, seen = fresh(tiny_model_dir), []
    put_back(before[: len(before) // 2])
    res = lora.run(lm.model, ctx_for(lm, work, seen.append), cfg)
    assert any("cannot be read" in m for m in logs_of(seen)) and res.report["resumed_from"] is None


def test_checkpoint_written_atomically_every_n_steps(tiny, tmp_path, text_file, monkeypatch):
    saved_at = []
    real = lora_progress.save_checkpoint

    def spy(path, state):
        real(path, state)
        saved_at.append(state["step"])
        assert not list(path.parent.glob("*.tmp")), "the temporary file is renamed over the checkpoint"

    monkeypatch.setattr(lora_progress, "save_checkpoint", spy)
    lora.run(tiny.model, ctx_for(tiny, tmp_path / "s"), quick(text_file, steps=7, checkpoint_every=3))
    assert saved_at == [3, 6]  # not after the last step: the adapter is saved then


# -- a real kill -9 after a checkpoint, resumed by replay --from-stage ---------------------------------
def _lora_recipe(tiny_model_dir, text_file):
    from tests.test_runner import tiny_recipe

    return tiny_recipe(
        tiny_model_dir,
        f"""
[[stages]]
kind = "width"
pattern = "2:4"
[[stages]]
kind = "lora"
dataset = "{text_file}"
steps = 8
batch_size = 4
seq_len = 32
lr = 0.03
dropout = 0.1
eval_every = 2
checkpoint_every = 4
mixed_precision = "no"
""",
    )


def test_kill_9_after_a_checkpoint_then_replay_from_stage_continues_from_it(tiny_model_dir, tmp_path, data_dir):
    from safetensors.torch import load_file

    from frankenlab.sessions import load_session, record_run

    text_file = tmp_path / "train.txt"
    text_file.write_text((TRAIN_TEXT.replace("\n", " ") + "\n") * 8)
    recipe = _lora_recipe(tiny_model_dir, text_file)
    recipe_path, out, marker = tmp_path / "r.toml", tmp_path / "run", tmp_path / "marker"
    recipe.save(recipe_path)
    args = ["run", str(recipe_path), "--out", str(out), "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "lora_kill_child.py"), str(marker), "4", "--", *args],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while not marker.exists():  # written right after the checkpoint at step 4, then the child hangs
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before its checkpoint: {proc.stdout.read()}")
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = load_session(out)
    assert killed.status == "interrupted" and killed.stages[2].status == "interrupted"
    assert (out / "stages" / "02-lora" / "checkpoint" / "state.pt").is_file()

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "frankenlab.tui",
            "replay",
            str(out),
            "--from-stage",
            "2",
            "--out",
            str(tmp_path / "resumed"),
            "--data-dir",
            str(data_dir),
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    said = resumed.stdout + resumed.stderr
    assert "Traceback" not in said, said
    new = load_session(tmp_path / "resumed")
    assert new.status == "done" and new.stages[2].status == "done", said
    report = new.stages[2].report
    assert report["resumed_from"] == 4 and report["steps"] == 8
    logged = [e.get("message", "") for e in new.events if e.get("event") == "LogLine"]
    assert any("resuming from the checkpoint at step 4/8" in m for m in logged), logged
    steps_run = [e["step"] for e in new.events if e.get("event") == "MetricMeasured" and e.get("name") == "lora_loss"]
    assert steps_run == [5, 6, 7, 8]
    assert "checkpoint in" in said and "carried over" in said  # the replay's note
    assert (out / "stages" / "02-lora" / "checkpoint" / "state.pt").is_file(), "the source is never written"

    whole = record_run(recipe, tmp_path / "whole", data_dir=data_dir)
    assert whole.status == "done" and whole.stages[2].report["resumed_from"] is None
    a = load_file(tmp_path / "whole" / "stages" / "02-lora" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "stages" / "02-lora" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert report["loss_curve"] == pytest.approx(whole.stages[2].report["loss_curve"], rel=1e-4)


# -- the curve in the lab's results ------------------------------------------------------------------
def _curve_session(path: Path):
    from frankenlab.sessions.session import Session, StageRecord

    curve = [[s, 3.41 - 0.39 * (1 - 0.5 ** (s / 16))] for s in range(0, 97, 16)]
    report = {
        "val_curve": curve,
        "val_windows": 16,
        "stop": {"step": 96, "cap": 512, "reason": "plateau: no validation loss 0.5 % below 3.03 in the last 4"},
        "loss_curve": [3.5 - 0.004 * i for i in range(96)],
    }
    stages = [
        StageRecord(0, "baseline", "baseline", status="done", params_count=1000, params_nonzero=1000, seconds=1.0),
        StageRecord(
            1, "lora", "lora", status="done", params_count=1000, params_nonzero=1000, seconds=9.0, report=report
        ),
    ]
    recipe = {
        "name": "curve",
        "description": "",
        "model": {"source": "models/tiny-llama"},
        "stages": [{"kind": "lora"}],
    }
    s = Session(recipe=recipe, stages=stages, events=[], status="done", id="0123456789ab", created=0.0)
    s.save(path / "session.json")
    return path / "session.json"


async def test_lab_results_draw_the_validation_curve(tiny, tmp_path, data_dir):
    from textual.widgets import Static

    from tests.test_tui import SIZE, make_app, wait_for

    app = make_app(tiny, tmp_path, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        line = app.query_one("#lora-curve", Static)
        assert not line.display, "no LoRA stage, no line"
        panel = app.query_one("#resultspanel")
        # live: a LoRA stage's validation losses as they are measured
        panel.handle(ev.StageStarted(3, "lora", {}))
        for step, value in [(0, 3.4), (16, 3.2), (32, 3.1)]:
            panel.handle(ev.MetricMeasured(3, "lora_val_loss", value, "train", step))
        await pilot.pause()
        assert line.display and str(line.render()) == "stage 3 lora: val loss █▃▁ 3.40 -> 3.10 (step 32)"
        # a saved session: the report's curve and why it stopped
        assert app._open_session(_curve_session(tmp_path))
        await wait_for(pilot, lambda: "stopped" in str(line.render()))
        text = str(line.render())
        assert text.startswith("stage 1 lora: val loss █") and text.endswith(
            "3.41 -> 3.03 (stopped at 96/512: plateau)"
        )
        await wait_for(pilot, lambda: line.region.height >= 1)  # drawn on screen, in the Results tab
        assert app.query_one("#tabs").active == "results" and line.display


def test_auto_precision_of_a_resumed_run_is_the_checkpoints(monkeypatch):
    """Under "auto" the precision is measured per process and can differ between the killed run and
    its resumption: the resumed run keeps the checkpoint's; an explicit setting is never overridden."""
    from frankenlab.pipeline.lora_train import _resumed_precision

    cpu = torch.device("cpu")
    saved_bf16 = {"compute_dtype": "bfloat16"}
    amp, why = _resumed_precision(saved_bf16, "auto", cpu, None, "auto: measured 0.9x")
    assert amp is torch.bfloat16 and "kept bfloat16 as the checkpoint was trained" in why
    amp, _ = _resumed_precision({"compute_dtype": "float32"}, "auto", cpu, torch.bfloat16, "auto: 2x")
    assert amp is None  # fp32 checkpoint: stays fp32
    assert _resumed_precision(saved_bf16, "no", cpu, None, "off")[0] is None  # explicit wins
    assert _resumed_precision(None, "auto", cpu, None, "fresh")[0] is None  # no checkpoint: as measured
    assert _resumed_precision({"compute_dtype": "float16"}, "auto", cpu, None, "x")[0] is None  # no fp16 on a CPU
