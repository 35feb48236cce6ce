"""Evaluation at the ceiling, on the tiny LLaMA: the blocked output head changes no number, QA decoding is greedy."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_qa import hf_generate
from benchmarks.ceiling import flops_per_token, plain_loop, time_breakdown
from frankenlab.evals.generate import _decode, eos_ids, generate_greedy, prompt_batches, token_classes
from frankenlab.evals.head import blocked_token_nll, head_token_nll, linear_head
from frankenlab.evals.perplexity import Protocol, nll_sum, perplexity, sequences_for
from frankenlab.evals.qa import build_prompt, load_items

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and the river Thames flows through London.",
    "",
    "Numbers 0 1 2 3 4 5 6 7 8 9 appear in text.",
    "Who wrote Hamlet?",
    "Valkyrie, Robert Boulter, Senjō no Valkyria 3: Unrecorded Chronicles is a tactical role-playing game.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def full_logits_nll(model, seqs) -> tuple[float, int]:
    """The reference: each sequence alone (no padding), full logits, cross-entropy in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=s[None]).logits[0, :-1].double()  # (T-1, V)
            total += float(F.cross_entropy(logits, s[1:], reduction="sum"))
            count += s.numel() - 1
    return total, count


@pytest.mark.parametrize("mode", ["rows", "concat"])
def test_perplexity_values_unchanged_by_the_blocked_head(tiny, tmp_path, mode):
    f = tmp_path / "text.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in LINES))
    r = perplexity(tiny.model, tiny.tokenizer, f"{f}-{mode}-24", batch_size=2)  # rows: padded batches
    seqs = [s for s, _ in sequences_for(Protocol.parse(f"{f}-{mode}-24"), tiny.tokenizer)[0]]
    assert len({s.numel() for s in seqs}) > 1 or mode == "concat"  # rows of different lengths: padding
    nll, n = full_logits_nll(tiny.model, seqs)
    assert r.tokens == n
    assert r.value == pytest.approx(math.exp(nll / n), rel=1e-5)
    if mode == "concat":  # and the plain loop of the benchmark scores the same windows to the same number
        assert math.exp(plain_loop(tiny.model, seqs, 2)[0] / n) == pytest.approx(r.value, rel=1e-5)


def test_no_full_logits_and_a_wrapped_head_falls_back(tiny):
    ids = torch.randint(0, len(tiny.tokenizer), (3, 30), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 20:] = -100  # unscored tail (padding)
    calls = []
    handle = tiny.model.lm_head.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    try:
        blocked = nll_sum(tiny.model, ids, labels)
    finally:
        handle.remove()
    assert calls == [], "the output head ran as a whole: full logits were built"
    assert linear_head(tiny.model) is tiny.model.lm_head

    class Wrapped(nn.Module):  # e.g. an adapter around the head: logits come from the model itself
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.weight = inner.weight

        def forward(self, x):
            return self.inner(x)

    inner = tiny.model.lm_head
    tiny.model.lm_head = Wrapped(inner)
    try:
        assert linear_head(tiny.model) is None
        full = nll_sum(tiny.model, ids, labels)
        x = torch.randn(7, inner.in_features)
        y = torch.randint(0, inner.out_features, (7,))
        with torch.no_grad():
            got, want = head_token_nll(tiny.model, x, y), F.cross_entropy(inner(x), y, reduction="none")
        assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    finally:
        tiny.model.lm_head = inner
    assert blocked[1] == full[1] == 3 * 29 - 10
    assert blocked[0] == pytest.approx(full[0], rel=1e-5)


def test_blocked_token_nll_per_token():
    g = torch.Generator().manual_seed(1)
    x, w, labels = (
        torch.randn(9, 8, generator=g),
        torch.randn(300, 8, generator=g),
        torch.randint(0, 300, (9,), generator=g),
    )
    want = F.cross_entropy(F.linear(x, w), labels, reduction="none")
    got = blocked_token_nll(x, w, None, labels, block=64)
    assert got.shape == (9,) and got.tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)


def test_in_place_logsumexp_is_torchs():
    """The head's in-place row logsumexp gives torch.logsumexp's values bit for bit (infinite rows
    too), consumes only its own tile, and leaves autograd to torch."""
    from frankenlab.evals.head import _logsumexp_rows

    g = torch.Generator().manual_seed(2)
    tile = torch.randn(7, 4096, generator=g) * 30
    tile[1, 5] = math.inf
    tile[2] = -math.inf
    tile[3, :100] = -math.inf
    want = torch.logsumexp(tile, dim=1)
    got = _logsumexp_rows(tile.clone())
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
    leaf = torch.randn(3, 50, generator=g, requires_grad=True)
    lse = _logsumexp_rows(leaf * 1.0)
    lse.sum().backward()
    assert torch.allclose(leaf.grad, torch.softmax(leaf.detach(), dim=1))


def test_time_breakdown_splits_one_batch(tiny):
    """The benchmark's one-thread profile: every kind timed, the FLOPs those of the batch (head on
    the scored positions only), and the caller's thread count left alone."""
    threads = torch.get_num_threads()
    b = time_breakdown(tiny.model, batch=2, seq_len=32)
    assert torch.get_num_threads() == threads
    assert b["tokens"] == 64 and b["wall_seconds"] > 0
    assert b["seconds"]["gemm"] > 0 and b["seconds"]["other"] > 0
    if tiny.model.config._attn_implementation == "sdpa":
        assert b["seconds"]["attention"] > 0
    head = tiny.model.lm_head.weight.numel()
    assert b["flops"]["gemm"] + b["flops"]["attention"] == pytest.approx(
        64 * flops_per_token(tiny.model, 32) - 2 * 2 * head
    )  # two unscored last positions


def test_flops_per_token_counts_linears_head_and_attention(tiny):
    cfg = tiny.model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads)
    assert shape + (cfg.num_key_value_heads, cfg.vocab_size) == (8, 64, 160, 4, 2, 320)  # the numbers below
    # Worked out by hand for that config and a causal window of 64 tokens:
    # - linear weights per layer: q, o 64x64 = 2 * 4096; k, v 32x64 (2 kv heads of 16) = 2 * 2048;
    #   gate, up, down 160x64 = 3 * 10240 -> 43008; 8 layers -> 344064; head 320x64 -> 20480;
    #   one multiply-add (2 FLOPs) per weight: 2 * (344064 + 20480) = 729088
    # - attention: token t of the window attends to t keys, (64 + 1) / 2 = 32.5 on average; per key and
    #   head QK^T and AV are 16 multiply-adds each = 64 FLOPs; 4 heads x 8 layers: 64 * 32.5 * 32 = 66560
    assert flops_per_token(tiny.model, 64) == pytest.approx(729088 + 66560)  # 795648


@pytest.mark.parametrize("newline", [True, False])
def test_our_batched_greedy_equals_model_generate(tiny, data_dir, newline):
    items, _, _ = load_items("closed", 6, seed=3, data_dir=data_dir)
    prompts = [build_prompt(it) for it in items]
    eos = torch.tensor(eos_ids(tiny.model, tiny.tokenizer))
    classes = token_classes(tiny.tokenizer) if newline else None
    for _idx, ids, mask in prompt_batches(tiny.tokenizer, prompts, batch_size=3):
        ours = _decode(tiny.model, ids, mask, 12, eos, classes, None)
        assert ours == hf_generate(tiny.model, tiny.tokenizer, ids, mask, 12, newline)
    # and generate_greedy hands the same batches' answers back in the caller's order
    gens = generate_greedy(
        tiny.model, tiny.tokenizer, prompts, max_new_tokens=12, stop_at_newline=newline, batch_size=3
    )
    assert [g.prompt for g in gens] == prompts


# -- linear layers on reordered weights (evals.packed) --------------------------------------------


def test_packed_linears_change_no_number_and_leave_the_model_as_it_was(tiny, tmp_path, monkeypatch):
    from frankenlab.evals.packed import Packs, available, packed_linears

    if not available():
        pytest.skip("this torch build has no oneDNN linear")
    f = tmp_path / "text.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in LINES))
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    class Spy:  # count the oneDNN calls without changing them
        def __call__(self, *a, **k):
            calls.append(a[3] if len(a) > 3 else "none")
            return original(*a, **k)

        def binary(self, *a, **k):
            calls.append("binary " + a[4])
            return original.binary(*a, **k)

    r_packed = perplexity(tiny.model, tiny.tokenizer, f"{f}-concat-24", batch_size=2)
    monkeypatch.setenv("FRANKENLAB_PACKED_LINEAR", "0")
    r_plain = perplexity(tiny.model, tiny.tokenizer, f"{f}-concat-24", batch_size=2)
    monkeypatch.delenv("FRANKENLAB_PACKED_LINEAR")
    assert r_packed.value == pytest.approx(r_plain.value, rel=1e-5)
    # the path really ran: every decoder linear and the head's blocks went through oneDNN
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 12))
    with packed_linears(tiny.model) as packs:
        nll_sum(tiny.model, ids, ids.clone(), packs)
    n_layers = len(tiny.model.model.layers)
    n_linear = sum(1 for m in tiny.model.model.layers.modules() if type(m) is nn.Linear)
    assert len(calls) >= n_linear + 1  # every decoder linear, and the head's blocks
    assert calls.count("swish") == n_layers and calls.count("binary mul") == n_layers  # each MLP fused
    assert not any("forward" in m.__dict__ for m in tiny.model.modules())  # all as it was
    # an MLP whose linears carry a hook runs them one by one, so the hook still sees its input
    seen = []
    handle = tiny.model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        calls.clear()
        with packed_linears(tiny.model) as packs:
            nll_sum(tiny.model, ids, ids.clone(), packs)
    finally:
        handle.remove()
    assert seen and calls.count("swish") == n_layers - 1
    # an in-place edit of a weight inside the block is seen (the pack is keyed by the tensor's version)
    lin = tiny.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    packs = Packs()
    with torch.no_grad():
        before = packs.linear(x, lin.weight)
        saved = lin.weight.clone()
        lin.weight.mul_(2.0)
        try:
            after = packs.linear(x, lin.weight)
        finally:
            lin.weight.copy_(saved)
    assert torch.allclose(after, 2 * before, atol=1e-5)


def test_packed_linears_fall_back_where_they_cannot_help(tiny):
    from frankenlab.evals.packed import Packs

    packs = Packs()
    w = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(3, 4)
    y = packs.linear(x, w)  # autograd: the plain op, and the gradient flows
    y.sum().backward()
    assert w.grad is not None and torch.allclose(y, F.linear(x, w))
    with torch.inference_mode():  # weights made in inference mode have no version counter
        wi, xi = torch.randn(5, 4), torch.randn(3, 4)
    assert torch.allclose(packs.linear(xi, wi), F.linear(xi, wi), atol=1e-6)
    xb, wb = x.bfloat16(), w.detach().bfloat16()
    assert torch.equal(packs.linear(xb, wb), F.linear(xb, wb))  # not float32: the plain op


def test_batch_cuts_pad_least_within_the_budget():
    import itertools
    import random

    from frankenlab.evals.perplexity import batch_cuts

    def greedy(lengths, budget):
        out, b = [], 0
        while b < len(lengths):
            rows = max(1, min(len(lengths) - b, budget // lengths[b]))
            out.append((b, b + rows))
            b += rows
        return out

    def cost(lengths, cuts, overhead):
        return sum((e - b) * lengths[b] + overhead for b, e in cuts)

    rng = random.Random(0)
    for _ in range(40):
        lengths = sorted(
            (rng.choice([rng.randint(1, 12), rng.randint(30, 64)]) for _ in range(rng.randint(1, 9))), reverse=True
        )
        budget, overhead = 64, 4
        cuts = batch_cuts(lengths, budget, overhead)
        assert [b for b, _ in cuts][0] == 0 and cuts[-1][1] == len(lengths)
        assert all(cuts[k][1] == cuts[k + 1][0] for k in range(len(cuts) - 1))  # every row once, in order
        assert all((e - b) * lengths[b] <= budget or e - b == 1 for b, e in cuts)
        assert cost(lengths, cuts, overhead) <= cost(lengths, greedy(lengths, budget), overhead)
        # optimal: no admissible set of cut points costs less (brute force over all of them)
        n = len(lengths)
        best = min(
            cost(lengths, c, overhead)
            for c in (
                [(a, b) for a, b in zip((0, *pts), (*pts, n), strict=False)]
                for r in range(n)
                for pts in itertools.combinations(range(1, n), r)
            )
            if all((e - b) * lengths[b] <= budget or e - b == 1 for b, e in c)
        )
        assert cost(lengths, cuts, overhead) == best


def test_rows_protocol_values_unchanged_by_the_batch_cuts(tiny, tmp_path, monkeypatch):
    import frankenlab.evals.perplexity as P

    f = tmp_path / "text.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in LINES * 3))
    ours = perplexity(tiny.model, tiny.tokenizer, f"{f}-rows-24", batch_size=2)
    monkeypatch.setattr(P, "batch_cuts", lambda lengths, budget: [(i, i + 1) for i in range(len(lengths))])
    one_by_one = perplexity(tiny.model, tiny.tokenizer, f"{f}-rows-24", batch_size=2)
    assert ours.tokens == one_by_one.tokens
    assert ours.value == pytest.approx(one_by_one.value, rel=1e-5)


def test_packed_linears_stay_off_when_memory_is_short(tiny, monkeypatch):
    import frankenlab.evals.packed as packed

    monkeypatch.setattr(packed, "available_memory", lambda: 1024)  # far less than two copies of the weights
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 12))
    with packed.packed_linears(tiny.model) as packs:
        assert not packs.enabled
        assert not any("forward" in m.__dict__ for m in tiny.model.modules())
        got = nll_sum(tiny.model, ids, ids.clone(), packs)
    assert got == nll_sum(tiny.model, ids, ids.clone())
