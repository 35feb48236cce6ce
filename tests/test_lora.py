"""LoRA recovery stage on the tiny random LLaMA: training, mask after merge, cancel, validation."""

import threading

import pytest
import torch

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.config import from_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import events as ev
from frankenlab.pipeline import lora_adapters
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.stages import lora, width
from tests.tiny import TRAIN_TEXT


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "repeated.txt"
    p.write_text((TRAIN_TEXT.replace("\n", " ") + "\n") * 8)
    return p


def ctx_for(tiny, tmp_path, listener=ev.ignore, **kw):
    return StageContext(tiny.tokenizer, torch.device("cpu"), work_dir=tmp_path / "stage", listener=listener, **kw)


def quick(text_file, **kw):
    base = dict(dataset=str(text_file), steps=8, batch_size=4, seq_len=32, lr=3e-2, dropout=0.0, seed=0)
    base["mixed_precision"] = "no"  # fp32 whatever this CPU measures under "auto" (tests/test_lora_precision.py)
    return lora.Config(**{**base, **kw})


def prune_2of4(model):
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in width.linear_modules(layer, width.ALL_PROJECTIONS).values():
                lin.weight.mul_(width.nm_prune_mask(lin.weight.abs(), 2, 4).float())


def test_training_reduces_loss_and_saves_peft_adapter(tiny, tmp_path, text_file):
    seen = []
    res = lora.run(tiny.model, ctx_for(tiny, tmp_path, seen.append), quick(text_file))
    r = res.report
    assert r["steps"] == 8
    assert sum(r["loss_curve"][-3:]) / 3 < r["first_loss"] - 0.3, r["loss_curve"]
    losses = [e for e in seen if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss"]
    assert [e.step for e in losses] == list(range(1, 9))
    assert any(isinstance(e, ev.MetricMeasured) and e.name == "lora_tokens_per_second" for e in seen)
    adapter = tmp_path / "stage" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not lora_adapters.is_peft(res.model) and r["merged"]


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_model_dir, tmp_path, text_file):
    from frankenlab.pipeline.loading import load_model

    want_lm, got_lm = (load_model(str(tiny_model_dir), device="cpu", dtype="float32") for _ in range(2))
    want = lora.run(want_lm.model, ctx_for(want_lm, tmp_path / "a"), quick(text_file, steps=3))
    real = type(got_lm.model.model).forward  # the decoder body: the training loss runs it, not the LM's forward
    rows = []

    def small_memory(self, *a, input_ids=None, **k):
        rows.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:  # four sequences do not fit, two do
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, *a, input_ids=input_ids, **k)

    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(got_lm.model.model), "forward", small_memory)
        got = lora.run(
            got_lm.model,
            ctx_for(got_lm, tmp_path / "b", lambda e: logs.append(e) if isinstance(e, ev.LogLine) else None),
            quick(text_file, steps=3),
        )
    assert rows[0] == 4 and set(rows[1:]) == {2}, "halved once, then every step at the size that fit"
    r = got.report
    assert (r["batch_size"], r["grad_accum"], r["samples"]) == (2, 2, 12)
    assert "effective batch stayed 4" in r["oom_note"]
    assert any("out of memory" in e.message for e in logs)
    assert r["loss_curve"] == pytest.approx(want.report["loss_curve"], rel=1e-4)
    for (name, a), b in zip(want.model.named_parameters(), got.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_out_of_memory_at_one_sequence_says_what_to_lower(tiny, tmp_path, text_file, monkeypatch):
    def never_fits(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(tiny.model.model), "forward", never_fits)
    with pytest.raises(torch.OutOfMemoryError) as err:
        lora.run(tiny.model, ctx_for(tiny, tmp_path), quick(text_file, steps=2, batch_size=2))
    text = str(err.value)
    assert "\n" not in text and text.startswith("out of memory in LoRA training")
    assert "lower seq_len (now 32) or rank (now" in text


def test_mask_reapplied_after_merge_and_merged_model_loads(tiny, tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    prune_2of4(tiny.model)
    res = lora.run(tiny.model, ctx_for(tiny, tmp_path), quick(text_file, steps=3))
    assert res.report["sparsity"].startswith("mask re-applied after merge")
    assert res.report["density_after"] == pytest.approx(0.5)
    assert res.report["density_before"] == pytest.approx(0.5)
    for layer in res.model.model.layers:
        for lin in width.linear_modules(layer, width.ALL_PROJECTIONS).values():
            assert width.satisfies_nm(lin.weight, 2, 4)
    out = tmp_path / "merged"
    res.model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(again(input_ids=ids).logits, res.model(input_ids=ids).logits)


def test_unmerged_adapter_keeps_base_zeros(tiny, tmp_path, text_file):
    prune_2of4(tiny.model)
    res = lora.run(tiny.model, ctx_for(tiny, tmp_path), quick(text_file, steps=2, merge=False))
    assert lora_adapters.is_peft(res.model)
    assert res.report["sparsity"].startswith("adapter kept separate")
    assert res.report["density_after"] == pytest.approx(0.5)
    logits = res.model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    assert torch.isfinite(logits).all()
    merged, remasked = lora_adapters.merge_keeping_mask(res.model)  # what the gptq stage does with it
    assert remasked == 4 * 8
    assert lora_adapters.targeted_density(merged, ("q_proj",)) == pytest.approx(0.5)


def test_cancel_keeps_last_completed_step(tiny, tmp_path, text_file):
    cancel = threading.Event()

    def listener(e):
        if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss" and e.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        lora.run(tiny.model, ctx_for(tiny, tmp_path, listener, cancel_event=cancel), quick(text_file))
    assert (tmp_path / "stage" / "adapter" / "adapter_model.safetensors").is_file()


def test_cancel_inside_a_step_drops_only_that_step(tiny, tmp_path, text_file):
    """A cancel raised during step 3's backward (after its first layer's gradient) ends the stage at
    once: the adapter of the 2 completed steps is saved, step 3 is not."""
    from frankenlab.pipeline.loading import decoder_layers

    cancel = threading.Event()
    steps_done = []
    backward_seen = []

    def listener(e):
        if isinstance(e, ev.MetricMeasured) and e.name == "lora_loss":
            steps_done.append(e.step)

    def arm(module, args, kwargs):  # during step 3, set the flag once the last layer's backward ran
        hidden = args[0] if args else kwargs.get("hidden_states")
        if len(steps_done) == 2 and hidden.requires_grad:

            def on_grad(grad):
                backward_seen.append(1)
                cancel.set()

            hidden.register_hook(on_grad)

    handle = decoder_layers(tiny.model)[-1].register_forward_pre_hook(arm, with_kwargs=True)
    try:
        with pytest.raises(Cancelled):
            lora.run(tiny.model, ctx_for(tiny, tmp_path, listener, cancel_event=cancel), quick(text_file))
    finally:
        handle.remove()
    assert backward_seen and steps_done == [1, 2]
    assert (tmp_path / "stage" / "adapter" / "adapter_model.safetensors").is_file()


def test_triviaqa_pairs_become_training_text(tiny, data_dir):
    windows, source = lora.training_windows(
        tiny.tokenizer, lora.Config(dataset="triviaqa", seq_len=64), data_dir, needed=4
    )
    assert windows.shape == (windows.shape[0], 64) and windows.shape[0] >= 4
    assert "triviaqa" in source
    assert "Answer:" in tiny.tokenizer.decode(windows[0])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rank": 0}, "rank must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"targets": ["q_proj", "qkv"]}, "unknown target projection"),
        ({"dataset": "imagenet"}, "unknown training dataset"),
        ({"lr": 0}, "lr (learning rate) must be positive"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"batch": 8}, "unknown key(s) batch"),
    ],
)
def test_config_validation(data, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        from_dict(lora.Config, data, "stage 1 (lora)")


def test_total_steps_from_samples():
    assert lora.Config().total_steps == 1024  # thesis: 8192 samples in batches of 8
    assert lora.Config(samples=100, batch_size=4, grad_accum=2).total_steps == 13
    assert lora.Config(steps=5).total_steps == 5
