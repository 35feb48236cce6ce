"""pipeline/lora_speed.py on the tiny LLaMA: the exact speed-up is exact, the others stay within their
stated tolerances, everything is undone afterwards, and the LoRA stage under bf16 uses them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frankenlab.pipeline import lora_speed
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.lora_adapters import add_adapter
from frankenlab.pipeline.lora_loss import LossSpec, micro_batch_loss
from frankenlab.pipeline.stages import lora
from tests.tiny import TRAIN_TEXT

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(model, dropout=0.0):
    return add_adapter(model, rank=4, alpha=8, dropout=dropout, targets=("q_proj", "v_proj"), seed=0)


def loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = micro_batch_loss(model, ids, LossSpec())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.ce, grads


def test_frozen_weights_in_bf16_are_exact_under_autocast_and_put_back(tiny):
    model = adapted(tiny.model)
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p for n, p in model.named_parameters()}
    want_ce, want = loss_and_grads(model, ids)
    with lora_speed.frozen_weights_in(model, torch.bfloat16) as n:
        assert n > 0
        linears = [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]
        assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
        got_ce, got = loss_and_grads(model, ids)
    assert got_ce == want_ce  # autocast's cast and .to(bfloat16) round alike: the same numbers
    assert all(torch.equal(got[k], want[k]) for k in want)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same fp32 objects
    assert all(p.dtype == torch.float32 for p in after.values())


def test_fast_dropout_drops_the_asked_fraction_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = lora_speed.FastDropout(0.1)
    x = torch.ones(400_000, requires_grad=True)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.003  # 400k draws: the standard error is 0.0005
    assert abs(float(y.detach().mean()) - 1.0) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 65536 / (65536 - 6554)))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * drop.scale)  # gradient through the kept values only
    drop.eval()
    assert drop(x) is x
    assert lora_speed.FastDropout(0.0)(x) is x
    with pytest.raises(ValueError):
        lora_speed.FastDropout(1.0)


def test_fast_dropout_replaces_peft_dropouts(tiny):
    model = adapted(tiny.model, dropout=0.2)
    assert lora_speed.fast_dropout(model) == 2 * tiny.model.config.num_hidden_layers
    drops = [m for m in model.modules() if isinstance(m, lora_speed.FastDropout)]
    assert drops and all(d.p == 0.2 for d in drops)
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())


def sdpa_out(q, k, v, mask=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_attention_matches_sdpa_within_bf16_rounding(masked):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 16, generator=gen) for h in (6, 2, 2))  # grouped-query: 3 heads per kv head
    mask = None
    if masked:  # left padding in window 0: its first 3 keys are never attended
        mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12).clone()
        mask[0, :, :, :3] = False
        mask[0, :, :3, 0] = True  # a padded row attends somewhere (as HF's masks do)
    module = nn.Module()
    got, _ = lora_speed.bf16_attention(module, q, k, v, mask, scaling=0.25)
    want = sdpa_out(q, k, v, mask)
    assert got.shape == want.shape == (2, 12, 6, 16)
    assert (got.float() - want).abs().max() < 0.05  # bf16 scores/probabilities: about 3 significant digits


def test_attention_as_gemms_runs_the_model_close_to_sdpa_and_restores_it(tiny):
    model = adapted(tiny.model)
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    want_ce, want = loss_and_grads(model, ids)
    config = tiny.model.config
    before = config._attn_implementation
    with lora_speed.attention_as_gemms(model, micro=2, seq_len=16) as used:
        assert used and config._attn_implementation == lora_speed.ATTENTION_NAME
        got_ce, got = loss_and_grads(model, ids)
    assert config._attn_implementation == before
    assert abs(got_ce - want_ce) / want_ce < 0.01
    for name in want:  # each adapter gradient within 5 % (relative norm of the difference)
        assert float((got[name] - want[name]).norm()) <= 0.05 * float(want[name].norm()), name


def test_attention_stays_the_models_own_when_its_scores_would_not_fit(tiny, monkeypatch):
    monkeypatch.setattr(lora_speed, "ATTENTION_BYTES", 1000)
    before = tiny.model.config._attn_implementation
    with lora_speed.attention_as_gemms(tiny.model, micro=8, seq_len=256) as used:
        assert not used and tiny.model.config._attn_implementation == before


def test_kept_heap_applies_and_undoes_without_error():
    with lora_speed.kept_heap() as applied:
        x = torch.empty(5 << 20, dtype=torch.uint8).fill_(1)
        del x
    assert isinstance(applied, bool)


def test_head_chunk_keeps_logits_under_the_limit(tiny):
    vocab = tiny.model.config.vocab_size
    assert lora_speed.head_chunk(tiny.model) == 512  # a tiny vocabulary: the default
    assert lora_speed.head_chunk(tiny.model, limit=64 * 4 * vocab) == 64
    assert lora_speed.head_chunk(tiny.model, limit=1) == 32


def test_nothing_applies_in_fp32_or_on_other_devices(tiny):
    model = adapted(tiny.model, dropout=0.1)
    with lora_speed.fast_training(model, CPU, None, 2, 16) as applied:
        assert applied == []
    with lora_speed.fast_training(model, torch.device("meta"), torch.bfloat16, 2, 16) as applied:
        assert applied == []
    assert not any(isinstance(m, lora_speed.FastDropout) for m in model.modules())


def test_the_lora_stage_under_bf16_uses_them_and_merges_into_fp32_weights(tiny, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text((TRAIN_TEXT.replace("\n", " ") + "\n") * 8)
    untouched = {n: p.detach().clone() for n, p in tiny.model.named_parameters() if "mlp" in n}
    config = lora.Config(
        dataset=str(text), steps=3, batch_size=2, seq_len=32, dropout=0.1, seed=0, mixed_precision="bf16"
    )
    ctx = StageContext(tiny.tokenizer, CPU, work_dir=tmp_path / "stage")
    result = lora.run(tiny.model, ctx, config)
    applied = result.report["speed_ups"]
    assert any("frozen linears stored in bf16" in a for a in applied)
    assert any("dropouts on 16-bit lanes" in a for a in applied)
    assert any("attention as bf16 GEMMs" in a for a in applied)
    merged = dict(result.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.values())
    assert all(torch.equal(merged[n], untouched[n]) for n in untouched)  # not targeted: bit for bit as before
    assert result.model.config._attn_implementation != lora_speed.ATTENTION_NAME
    assert (
        result.model.lm_head.weight is result.model.model.embed_tokens.weight
        or not tiny.model.config.tie_word_embeddings
    )
