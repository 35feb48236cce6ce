"""The LoRA stage's chunked loss (pipeline/lora_loss.py): HF's loss and adapter gradients, chunks only,
no wasted positions, no input gradient below the adapters, and the distillation terms."""

import pytest
import torch
import torch.nn.functional as F

from frankenlab.pipeline.distill import kl_full
from frankenlab.pipeline.lora_adapters import _peft
from frankenlab.pipeline.lora_loss import IGNORE, LossSpec, TeacherBatch, head_loss, kd_terms, micro_batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def peft_tiny(tiny, targets=("q_proj", "v_proj")):
    LoraConfig, get_peft_model = _peft()
    torch.manual_seed(0)
    model = get_peft_model(
        tiny.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # non-zero B: the adapters change the output and get gradients through A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_equals_hf_loss_and_adapter_gradients(tiny):
    model = peft_tiny(tiny)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:9] = IGNORE  # ignored positions count in neither
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    got = micro_batch_loss(model, ids, LossSpec(chunk_tokens=7), labels=labels)  # 7: chunks cut windows
    got.loss.backward()
    have = grads(model)
    assert float(got.loss.detach()) == pytest.approx(float(ref), rel=1e-6) and got.ce == pytest.approx(
        float(ref), rel=1e-6
    )
    assert got.tokens == 3 * 39 - 4
    assert set(have) == set(want) and len(want) == 2 * 2 * len(model.base_model.model.model.layers)
    assert all("lora_" in n for n in have), "only the adapters get gradients"
    for name in want:
        assert torch.allclose(have[name], want[name], rtol=1e-4, atol=1e-7), name
    with torch.no_grad():  # no graph: the value alone
        assert float(micro_batch_loss(model, ids, labels=labels).loss) == pytest.approx(float(ref), rel=1e-6)


def test_head_sees_only_chunks_of_scored_positions(tiny):
    model = peft_tiny(tiny)
    head = model.get_base_model().lm_head
    rows = []
    handle = head.register_forward_hook(lambda m, a, out: rows.append(tuple(out.shape)))
    ids = torch.randint(0, model.config.vocab_size, (4, 33))
    micro_batch_loss(model, ids, LossSpec(chunk_tokens=50)).loss.backward()
    handle.remove()
    assert [r[0] for r in rows] == [50, 50, 28], "chunks of 50, never all 4 x 33 positions at once"
    assert sum(r[0] for r in rows) == 4 * 32, "the last position of a window (no next token) is never projected"


def test_no_input_gradient_below_the_first_adapted_layer(tiny):
    model = peft_tiny(tiny)
    base = model.get_base_model()
    seen = {}
    h1 = base.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.update(embed=out.requires_grad))
    h2 = base.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(layer0=(a[0] if a else k["hidden_states"]).requires_grad), with_kwargs=True
    )
    micro_batch_loss(model, torch.randint(0, model.config.vocab_size, (2, 16))).loss.backward()
    h1.remove(), h2.remove()
    assert not base.model.embed_tokens.weight.requires_grad and base.model.embed_tokens.weight.grad is None
    assert seen == {"embed": False, "layer0": False}, "frozen embeddings: the backward stops at the first adapter"


def test_kd_terms_full_and_top_k():
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 50, generator=gen) * 3, torch.randn(6, 50, generator=gen) * 3
    head = torch.nn.Identity()
    exact = kd_terms(z, TeacherBatch(hidden=t, head=head), 2.0)
    assert float(exact) == pytest.approx(float(kl_full(z, t, 2.0).sum()), rel=1e-5) and float(exact) > 0
    assert float(kd_terms(t, TeacherBatch(hidden=t, head=head), 2.0)) == pytest.approx(0.0, abs=1e-5)

    def top(k, student):
        v, i = t.topk(k, dim=-1)
        return float(kd_terms(student, TeacherBatch(values=v, indices=i, lse=torch.logsumexp(t / 2.0, -1)), 2.0))

    assert top(50, z) == pytest.approx(float(exact), rel=1e-5), "k = V is the exact KL"
    assert 0 < top(8, z) <= float(exact) + 1e-5, "coarse-grained to top-k + tail: never above the exact KL"
    assert top(8, t) == pytest.approx(0.0, abs=1e-5), "student == teacher: zero, the tail included"


def test_ce_plus_kd_mixes_with_the_weight():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 8, generator=gen), torch.randn(30, 8, generator=gen)
    tx, labels = torch.randn(10, 8, generator=gen), torch.randint(0, 30, (10,), generator=gen)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    head.weight.copy_(w)
    teacher = TeacherBatch(hidden=tx, head=head)
    ce = head_loss(x, head, labels, LossSpec("ce"))
    kd = head_loss(x, head, labels, LossSpec("kd", temperature=3.0), teacher)
    mix = head_loss(x, head, labels, LossSpec("ce+kd", temperature=3.0, kd_weight=0.3, chunk_tokens=3), teacher)
    assert ce.ce == pytest.approx(float(F.cross_entropy(x @ w.T, labels)), rel=1e-6)
    assert kd.kd == pytest.approx(float(kl_full(x @ w.T, tx @ w.T, 3.0).mean()), rel=1e-5)
    assert float(mix.loss) == pytest.approx(0.7 * ce.ce + 0.3 * kd.kd, rel=1e-6)
    # and the gradient of the mix is the mix of the gradients
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    head_loss(xs[0], head, labels, LossSpec("ce")).loss.backward()
    head_loss(xs[1], head, labels, LossSpec("kd", temperature=3.0), teacher).loss.backward()
    head_loss(xs[2], head, labels, LossSpec("ce+kd", temperature=3.0, kd_weight=0.3), teacher).loss.backward()
    assert torch.allclose(xs[2].grad, 0.7 * xs[0].grad + 0.3 * xs[1].grad, atol=1e-6)
