"""Evaluation on the tiny LLaMA: perplexity protocols, QA records, samples, the suite, data, the CLI."""

import gzip
import json
import math

import pytest
import torch

from frankenlab.evals import data as evdata
from frankenlab.evals import data_checks
from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.generate import generate_greedy, newline_token_ids
from frankenlab.evals.perplexity import Protocol, concat_windows, perplexity, row_sequences
from frankenlab.evals.qa import build_prompt, load_items, parse_triviaqa, protocol_name, run_qa, score
from frankenlab.evals.suite import EvalConfig, evaluate

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def hand_perplexity(model, ids: list[int]) -> float:
    """exp(mean NLL), one prefix at a time: position t is scored from a forward pass over ids[:t]."""
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
    return math.exp(nll / (len(ids) - 1))


# -- perplexity ------------------------------------------------------------------------------------


def test_perplexity_matches_hand_computed_value(tiny, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text(TEXT)
    ids = tiny.tokenizer(TEXT).input_ids
    expected = hand_perplexity(tiny.model, ids)
    n = len(ids)
    r = perplexity(tiny.model, tiny.tokenizer, f"{f}-concat-{n}")
    assert r.value == pytest.approx(expected, rel=1e-4)
    assert (r.tokens, r.sequences, r.protocol) == (n - 1, 1, f"tiny.txt-concat-{n}")
    rows = perplexity(tiny.model, tiny.tokenizer, f"{f}-rows-512")  # one line = one row, same tokens
    assert rows.value == pytest.approx(expected, rel=1e-4)


def test_rows_protocol_masks_padding_and_batches_agree(tiny, tmp_path):
    lines = [
        "The quick brown fox.",
        "Paris is the capital of France and the river Thames flows through London.",
        "",
        "Numbers 0 1 2 3 4 5 6 7 8 9 appear in text.",
        "Who wrote Hamlet?",
    ]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    nll, count = 0.0, 0
    for t in lines:
        if not t:
            continue
        ids = tiny.tokenizer(t).input_ids
        nll += math.log(hand_perplexity(tiny.model, ids)) * (len(ids) - 1)
        count += len(ids) - 1
    expected = math.exp(nll / count)
    for bs in (1, 2, 8):  # padded batches must give the unpadded, per-row answer
        r = perplexity(tiny.model, tiny.tokenizer, f"{f}-rows-512", batch_size=bs)
        assert r.value == pytest.approx(expected, rel=1e-4)
        assert r.tokens == count and r.sequences == 4  # the empty row holds nothing to score


def test_rows_truncate_to_length(tiny):
    seqs = row_sequences(tiny.tokenizer, [TEXT * 10, "short one"], 16)
    assert [s.numel() for s in seqs] == [16, len(tiny.tokenizer("short one").input_ids)]


def test_concat_windows_and_stride(tiny):
    texts = [TEXT] * 6
    ids = tiny.tokenizer("\n\n".join(texts)).input_ids
    w = concat_windows(tiny.tokenizer, texts, 32)
    assert len(w) == len(ids) // 32 and all(x.numel() == 32 and skip == 0 for x, skip in w)
    assert w[1][0].tolist() == ids[32:64]
    s = concat_windows(tiny.tokenizer, texts, 32, stride=16)
    assert s[0][1] == 0 and all(skip == 16 for _, skip in s[1:-1])  # only unseen tokens are scored
    assert s[-1][0][-1].item() == ids[-1]  # the strided protocol covers the whole text
    limited = concat_windows(tiny.tokenizer, texts, 32, limit=2)
    assert [x.tolist() for x, _ in limited] == [x.tolist() for x, _ in w[:2]]


def test_both_wikitext_protocols_on_tiny(tiny, data_dir):
    rows = perplexity(tiny.model, tiny.tokenizer, "wikitext2-rows-512", data_dir=data_dir, limit=6, batch_size=2)
    concat = perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-128", data_dir=data_dir, limit=4)
    assert rows.protocol == "wikitext2-rows-512:first6" and rows.sequences == 6
    assert concat.protocol == "wikitext2-concat-128:first4" and concat.tokens == 4 * 127
    vocab = len(tiny.tokenizer)
    for r in (rows, concat):  # a random model is near-uniform over its vocabulary, not degenerate
        assert vocab / 4 < r.value < vocab * 4
        assert r.source.endswith("wikitext-2-raw-v1-test.jsonl")
    # the limited prefix tokenization gives exactly the full tokenization's first windows
    full = concat_windows(tiny.tokenizer, evdata.load_texts("wikitext2", data_dir=data_dir)[0], 128)
    again = perplexity(tiny.model, tiny.tokenizer, Protocol("wikitext2", "concat", 128, limit=4), data_dir=data_dir)
    assert again.value == pytest.approx(concat.value)
    from frankenlab.evals.perplexity import score_sequences

    nll, n = score_sequences(tiny.model, full[:4])
    assert math.exp(nll / n) == pytest.approx(concat.value, rel=1e-5)


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("wikitext2-rows-512", ("wikitext2", "rows", 512, None, None)),
        ("c4-concat-2048", ("c4", "concat", 2048, None, None)),
        ("wikitext2-concat-512-stride256:first8", ("wikitext2", "concat", 512, 256, 8)),
        ("/data/my-notes.txt-concat-64", ("/data/my-notes.txt", "concat", 64, None, None)),
    ],
)
def test_protocol_names_round_trip(name, parsed):
    p = Protocol.parse(name)
    assert (p.data, p.mode, p.seq_len, p.stride, p.limit) == parsed
    assert Protocol.parse(p.name).name == p.name


@pytest.mark.parametrize(
    "bad",
    ["wikitext2", "wikitext2-rows", "wikitext2-rows-1", "wikitext2-rows-512-stride8", "wikitext2-concat-64-stride128"],
)
def test_bad_protocols(bad):
    with pytest.raises(ValueError):
        Protocol.parse(bad)


def test_perplexity_cancel_and_progress(tiny, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 20)
    seen = []
    perplexity(tiny.model, tiny.tokenizer, f"{f}-concat-16", batch_size=2, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 2
    with pytest.raises(Cancelled):
        perplexity(tiny.model, tiny.tokenizer, f"{f}-concat-16", cancelled=lambda: True)


def test_perplexity_cancel_reaches_inside_a_batch(tiny, tmp_path):
    """A cancel set while a batch is in the decoder stops at the next layer, not after the batch."""
    from frankenlab.evals.cancel import cancel_between_layers
    from frankenlab.pipeline.loading import decoder_layers

    f = tmp_path / "t.txt"
    f.write_text(TEXT * 20)
    layers = decoder_layers(tiny.model)
    ran: list[int] = []
    flag = {"set": False}
    handles = [layer.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    # the flag goes up while layer 1 of the first batch runs: layers 2.. of that batch must not run
    handles.append(layers[1].register_forward_hook(lambda *_a: flag.update(set=True)))
    try:
        with pytest.raises(Cancelled):
            perplexity(tiny.model, tiny.tokenizer, f"{f}-concat-16", batch_size=2, cancelled=lambda: flag["set"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1], ran  # layers that finished: the first batch stopped before layer 2
    with cancel_between_layers(tiny.model, None):  # no flag: nothing registered, nothing raised
        pass
    assert all(not layer._forward_pre_hooks for layer in layers)  # hooks removed after the cancel


@pytest.fixture
def two_threads():
    """Side-by-side batches need two intra-op threads to share out (the module runs on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_side_by_side_batches_give_the_serial_numbers(tiny, tmp_path, monkeypatch, two_threads):
    """Two batches at once on a CPU: the same NLL as one after the other (summed in batch order),
    progress on the caller's thread up to 1, the caller's thread count and a later thread's untouched."""
    import threading

    from frankenlab.evals.side_by_side import eval_workers
    from frankenlab.pipeline.loading import decoder_layers

    f = tmp_path / "t.txt"
    f.write_text(TEXT * 30)
    protocol = f"{f}-concat-16"
    monkeypatch.setenv("FRANKENLAB_EVAL_WORKERS", "1")
    serial = perplexity(tiny.model, tiny.tokenizer, protocol, batch_size=2)
    monkeypatch.delenv("FRANKENLAB_EVAL_WORKERS")
    assert eval_workers("cpu", 5) == 2 and eval_workers("cpu", 1) == 1 and eval_workers("cuda", 5) == 1
    ran_on, seen = set(), []
    h = decoder_layers(tiny.model)[0].register_forward_hook(lambda *_a: ran_on.add(threading.current_thread().name))
    caller = threading.current_thread().name
    try:
        both = perplexity(
            tiny.model,
            tiny.tokenizer,
            protocol,
            batch_size=2,
            progress=lambda x: seen.append((x, threading.current_thread().name)),
        )
    finally:
        h.remove()
    assert serial.sequences >= 6
    assert len(ran_on) == 2 and all(n.startswith("frankenlab-eval") for n in ran_on)  # two pool threads
    assert both.value == pytest.approx(serial.value, rel=1e-9) and both.tokens == serial.tokens
    assert [x for x, _ in seen] == sorted(x for x, _ in seen) and seen[-1][0] == 1.0
    assert {n for _, n in seen} == {caller}
    assert torch.get_num_threads() == 2
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]  # the pool's one-thread setting did not leak to threads started afterwards


def test_side_by_side_cancel_and_errors(tiny, tmp_path, two_threads):
    """A cancel stops both batches in flight at their next layer; an error in one batch (an
    out-of-memory, say) is raised as itself, the other batch stopped; the pool works afterwards."""
    import threading

    from frankenlab.pipeline.loading import decoder_layers

    f = tmp_path / "t.txt"
    f.write_text(TEXT * 30)
    protocol = f"{f}-concat-16"
    layers = decoder_layers(tiny.model)
    clean = perplexity(tiny.model, tiny.tokenizer, protocol, batch_size=2)
    calls: list[int] = []
    flag = {"set": False}
    hs = [layer.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    hs.append(layers[1].register_forward_hook(lambda *_a: flag.update(set=True)))
    try:
        with pytest.raises(Cancelled):
            perplexity(tiny.model, tiny.tokenizer, protocol, batch_size=2, cancelled=lambda: flag["set"])
    finally:
        for h in hs:
            h.remove()
    assert max(calls) <= 2 and len(calls) <= 2 * 3, calls  # neither batch went past the layer in flight

    seen = {"n": 0}

    def boom(*_a):
        seen["n"] += 1
        if seen["n"] == 2:
            raise RuntimeError("out of memory (simulated)")

    h = layers[3].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            perplexity(tiny.model, tiny.tokenizer, protocol, batch_size=2)
    finally:
        h.remove()
    assert all(not layer._forward_pre_hooks for layer in layers)

    def gone(_fraction):  # the screen that showed progress went away
        raise KeyError("progress display closed")

    with pytest.raises(KeyError):
        perplexity(tiny.model, tiny.tokenizer, protocol, batch_size=2, progress=gone)
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert not [t for t in threading.enumerate() if t.name.startswith("frankenlab-eval")]  # the pool ended with it
    again = perplexity(tiny.model, tiny.tokenizer, protocol, batch_size=2)
    assert again.value == clean.value


def test_freed_memory_settings_hold_while_any_block_is_open(monkeypatch):
    """glibc's thresholds go up on the first open block, to glibc's own dynamic state (and free
    memory returned) when the last closes; nothing happens with FRANKENLAB_MALLOC_TUNING=0 or without glibc."""
    from frankenlab.evals import malloc

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(malloc, "_glibc", lambda: FakeLibc())
    with malloc.reuse_freed_memory():
        opened = list(calls)
        with malloc.reuse_freed_memory():
            assert calls == opened  # nested: nothing more
        assert calls == opened
    assert dict((p, v) for _, p, v in opened) == {
        malloc.M_MMAP_THRESHOLD: malloc.MMAP_THRESHOLD,
        malloc.M_TRIM_THRESHOLD: malloc.KEEP_FREE,
        malloc.M_TOP_PAD: malloc.TOP_PAD,
    }
    closed = calls[len(opened) :]
    assert ("trim", 0) == closed[-1]
    # left where glibc's own dynamic rule lands once the 32 MiB mmap threshold is reached, not at
    # its 128 KiB starting trim threshold (which made later work in the process fault far more)
    assert {(p, v) for _, p, v in closed[:-1]} == {
        (malloc.M_TRIM_THRESHOLD, 2 * malloc.MMAP_THRESHOLD),
        (malloc.M_TOP_PAD, 128 << 10),
    }
    assert malloc._open == 0
    calls.clear()
    monkeypatch.setenv("FRANKENLAB_MALLOC_TUNING", "0")
    with malloc.reuse_freed_memory():
        pass
    assert calls == []
    monkeypatch.delenv("FRANKENLAB_MALLOC_TUNING")
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    with malloc.reuse_freed_memory():
        pass
    assert calls == []


# -- generation and QA -------------------------------------------------------------------------------


def _force_tokens(model, first: int, then: int):
    """Make greedy decoding pick `first`, then `then` at every later step (a hook on the output head)."""
    calls = []

    def hook(module, inputs, output):
        output = output.clone()
        output[..., first if not calls else then] = output.abs().max() + 100.0
        calls.append(1)
        return output

    return model.lm_head.register_forward_hook(hook)


def _generate_forced(tiny, first, then, **kw):
    h = _force_tokens(tiny.model, first, then)
    try:
        return generate_greedy(tiny.model, tiny.tokenizer, ["Question: Where?\nAnswer:"], **kw)[0]
    finally:
        h.remove()


def test_generation_stops_at_end_of_line_and_caps_at_50(tiny):
    tok = tiny.tokenizer
    nl = int(newline_token_ids(tok)[0])
    word = tok("Paris").input_ids[0]
    assert "\n" in tok.decode([nl]) and "\n" not in tok.decode([word]) and tok.decode([word]).strip()
    g = _generate_forced(tiny, word, nl, max_new_tokens=50)
    assert (g.new_tokens, g.text) == (2, tok.decode([word]) + tok.decode([nl]))  # text, then the line ends
    g = _generate_forced(tiny, word, word, max_new_tokens=50)
    assert g.new_tokens == 50 and g.text == tok.decode([word]) * 50  # no newline: capped
    g = _generate_forced(tiny, nl, nl, max_new_tokens=50)
    assert g.new_tokens == 50 and not g.text.strip()  # blank lines before any text do not end the answer
    g = _generate_forced(tiny, tok.eos_token_id, tok.eos_token_id, max_new_tokens=50)
    assert g.new_tokens == 2  # at least one new token: end-of-sequence is barred from the first step only
    g = _generate_forced(tiny, nl, word, max_new_tokens=5, stop_at_newline=False)
    assert g.new_tokens == 5 and "\n" in g.text  # samples run on past newlines


def test_left_padded_batches_match_one_by_one(tiny):
    prompts = [
        "Question: Who wrote Hamlet?\nAnswer:",
        "The river",
        "Context: The Chipmunks were created by Ross Bagdasarian.\nQuestion: Who created them?\nAnswer:",
    ]
    one = [
        generate_greedy(tiny.model, tiny.tokenizer, [p], max_new_tokens=8, stop_at_newline=False)[0] for p in prompts
    ]
    batched = generate_greedy(
        tiny.model, tiny.tokenizer, prompts, max_new_tokens=8, stop_at_newline=False, batch_size=3
    )
    assert [g.text for g in batched] == [g.text for g in one]
    assert [g.prompt for g in batched] == prompts  # the caller's order, though batches sort by length
    for p, g in zip(prompts, one, strict=False):  # our loop decodes exactly as Hugging Face's greedy generate does
        ids = tiny.tokenizer(p, return_tensors="pt").input_ids
        ref = tiny.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )
        assert g.text == tiny.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)


def test_finished_rows_leave_the_batch(tiny):
    """A row that stops early leaves the batch; the rows that go on decode exactly as they would alone."""
    from frankenlab.evals.generate import _decode

    tok = tiny.tokenizer
    prompts = ["Question: Who wrote Hamlet?\nAnswer:", "The river Thames flows", "Paris is the capital"]
    enc = [tok(p).input_ids for p in prompts]
    width = max(map(len, enc))
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for r, e in enumerate(enc):
        ids[r, width - len(e) :], mask[r, width - len(e) :] = torch.tensor(e), 1
    no_eos = torch.tensor([], dtype=torch.long)
    alone = [
        _decode(tiny.model, torch.tensor([e]), torch.ones(1, len(e), dtype=torch.long), 8, no_eos, None, None)[0]
        for e in enc
    ]

    def cut(toks, stop):
        return toks[: toks.index(stop) + 1] if stop in toks else toks

    # treat a token as a line end such that the rows stop at different steps
    stop = next(t for t in sorted({t for a in alone for t in a}) if len({len(cut(a, t)) for a in alone}) > 1)
    classes = (torch.tensor([stop]), torch.tensor([], dtype=torch.long))
    together = _decode(tiny.model, ids, mask, 8, no_eos, classes, None)
    assert together == [cut(a, stop) for a in alone]
    assert min(map(len, together)) < max(map(len, together))  # someone left the batch early


def test_triviaqa_items_and_prompts(data_dir, tiny):
    items, source, total = load_items("closed", 5, seed=0, data_dir=data_dir)
    assert total == 2000 and source.endswith("triviaqa_validation_2000.jsonl")
    assert [i.index for i in items] == sorted(i.index for i in items)
    assert items == load_items("closed", 5, seed=0, data_dir=data_dir)[0]  # seeded: the same set
    assert items != load_items("closed", 5, seed=1, data_dir=data_dir)[0]
    it = items[0]
    assert not it.question.startswith("Question:") and "Answer:" not in it.question
    assert build_prompt(it) == f"Question: {it.question}\nAnswer:"
    chat = build_prompt(it, chat=True, tokenizer=tiny.tokenizer)
    assert chat.startswith("<|im_start|>user\nQuestion: ") and chat.endswith("<|im_start|>assistant\n")
    row = {
        "context": "Question: Who was the man behind The Chipmunks?\nAnswer:",
        "answer": "David Seville",
        "aliases": ["Ross Bagdasarian", "David Seville"],
    }
    parsed = parse_triviaqa(row, 7)
    assert parsed.question == "Who was the man behind The Chipmunks?"
    assert parsed.aliases == ("Ross Bagdasarian", "David Seville")
    hub = {"question": "Q?", "answer": {"value": "Onion", "aliases": ["Onions"]}}
    assert parse_triviaqa(hub, 0).aliases == ("Onion", "Onions")


def test_open_book_is_nq_open_with_gold_passage(data_dir):
    items, source, _ = load_items("open", 3, data_dir=data_dir)
    assert "nq-open-oracle" in source
    with gzip.open(source, "rt") as f:
        rows = [json.loads(line) for line in f]
    for it in items:
        assert it.context == rows[it.index]["ctxs"][0]["text"].strip()
        assert it.aliases == tuple(rows[it.index]["answers"])
        assert build_prompt(it) == f"Context: {it.context}\nQuestion: {it.question}\nAnswer:"
    assert protocol_name("open", 3, 0, False, 2655) == "nq-open-oracle-openbook:3:first-line"
    assert (
        protocol_name("closed", 200, 3, True, 2000, match="thesis")
        == "triviaqa-closed-validation:200:seed3+chat:thesis"
    )


def test_qa_records_from_scoring():
    from frankenlab.evals.generate import Generation
    from frankenlab.evals.qa import QAItem

    items = [
        QAItem(0, "Capital of France?", ("Paris",)),
        QAItem(1, "Who wrote Hamlet?", ("William Shakespeare",)),
        QAItem(2, "Chipmunks?", ("Ross Bagdasarian Sr",)),
        QAItem(3, "Largest planet?", ("Jupiter",)),
    ]
    gens = [
        Generation("", " Paris\nQuestion: x", 3),
        Generation("", " It was William Shakespeare.", 7),
        Generation("", " Bagdasarian, Ross Sr", 6),
        Generation("", " Saturn", 2),
    ]
    records, acc, em, rules = score(items, gens)
    assert acc == 0.75 and em == 0.25
    assert rules == {"exact": 1, "substring": 1, "words": 1, "none": 1}
    assert [r["rule"] for r in records] == ["exact", "substring", "words", None]
    assert records[0]["prediction"] == "Paris" and records[0]["generated"] == " Paris\nQuestion: x"
    assert records[1]["matched_alias"] == "William Shakespeare" and records[3]["matched_alias"] is None
    assert set(records[0]) >= {
        "index",
        "question",
        "prediction",
        "correct",
        "exact_match",
        "rule",
        "matched_alias",
        "aliases",
        "new_tokens",
    }


def test_run_qa_on_tiny_keeps_a_record_per_question(tiny, data_dir):
    r = run_qa(tiny.model, tiny.tokenizer, "closed", 6, batch_size=4, data_dir=data_dir, max_new_tokens=6)
    assert r.n == len(r.records) == 6 and r.protocol == "triviaqa-closed-validation:6:first-line"
    assert sum(r.rules.values()) == 6 and r.accuracy == sum(x["correct"] for x in r.records) / 6
    for rec in r.records:
        assert 1 <= rec["new_tokens"] <= 6 and "\n" not in rec["prediction"]


# -- the suite -------------------------------------------------------------------------------------


def test_evaluate_runs_everything_configured(tiny, data_dir):
    cfg = EvalConfig(
        perplexity=("wikitext2-rows-512", "wikitext2-concat-64"),
        ppl_limit=3,
        triviaqa_closed=4,
        triviaqa_open=2,
        qa_batch_size=4,
        samples=True,
    )
    progress, metrics = [], []
    r = evaluate(
        tiny.model,
        tiny.tokenizer,
        cfg,
        data_dir=data_dir,
        progress=lambda f, m: progress.append((f, m)),
        on_metric=metrics.append,
    )
    assert [m["name"] for m in r.metrics] == ["perplexity", "perplexity", "triviaqa_closed", "triviaqa_open"]
    assert metrics == r.metrics
    assert [m["protocol"] for m in r.metrics] == [
        "wikitext2-rows-512:first3",
        "wikitext2-concat-64:first3",
        "triviaqa-closed-validation:4:first-line",
        "nq-open-oracle-openbook:2:first-line",
    ]
    qa = r.get("triviaqa_closed")
    assert {"exact_match", "n", "value", "protocol"} <= set(qa) and qa["n"] == 4
    assert len(r.details["triviaqa_closed"]["records"]) == 4 and len(r.details["triviaqa_open"]["records"]) == 2
    samples = r.details["samples"]["items"]
    assert samples[0]["prompt"] == "Question: Who was the man behind The Chipmunks?\nAnswer:"
    assert all(1 <= s["new_tokens"] <= 40 for s in samples)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1.0
    assert any("triviaqa_open" in m for _, m in progress)
    json.dumps(r.metrics), json.dumps(r.details)  # session records must serialize


def test_evaluate_cancels_between_batches(tiny, data_dir):
    cfg = EvalConfig(perplexity=("wikitext2-concat-64",), ppl_limit=8, batch_size=1, samples=False)
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        evaluate(tiny.model, tiny.tokenizer, cfg, data_dir=data_dir, cancelled=cancelled)
    assert len(calls) == 4  # it stopped at the first check after the flag went up


def test_eval_config_validation():
    from frankenlab.evals.config import from_dict
    from frankenlab.evals.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown perplexity protocol"):
        EvalConfig(perplexity=("wikitext-512",))
    with pytest.raises(RecipeError, match="stride"):
        from_dict(EvalConfig, {"ppl_stride": 0}, "evaluation")
    cfg = from_dict(
        EvalConfig,
        {"perplexity": ["wikitext2-concat-512", "wikitext2-rows-512"], "ppl_stride": 256, "ppl_limit": 4},
        "evaluation",
    )
    assert cfg.protocol("wikitext2-concat-512").name == "wikitext2-concat-512-stride256:first4"
    assert cfg.protocol("wikitext2-rows-512").name == "wikitext2-rows-512:first4"  # stride: concat only


# -- data resolution ---------------------------------------------------------------------------------


def test_data_resolution_order(tmp_path, monkeypatch, data_dir):
    monkeypatch.setattr(evdata, "_hub_reachable", lambda: True)
    monkeypatch.setattr(evdata, "_from_hub", lambda info, limit: [{"text": "from the hub"}])
    explicit = tmp_path / "mine.jsonl"
    explicit.write_text(json.dumps({"text": "explicit"}) + "\n")
    # 1. an explicit file wins over everything
    assert evdata.load_texts("wikitext2", path=explicit, data_dir=data_dir) == (["explicit"], str(explicit))
    # 2. then the data directory (argument, or the environment variable)
    texts, where = evdata.load_texts("wikitext2", data_dir=data_dir, limit=2)
    assert where == str(data_dir / "wikitext2/wikitext-2-raw-v1-test.jsonl") and len(texts) == 2
    monkeypatch.setenv(data_checks.DATA_DIR_ENV, str(data_dir))
    assert evdata.load_texts("wikitext2", limit=1)[1] == where
    # 3. then the hub
    monkeypatch.delenv(data_checks.DATA_DIR_ENV)
    assert evdata.load_texts("wikitext2", data_dir=tmp_path / "empty") == (["from the hub"], "hub:wikitext")


def test_data_not_found_names_all_three_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(evdata, "_hub_reachable", lambda: False)
    monkeypatch.setattr(evdata, "_hub_cache_path", lambda info: None)
    monkeypatch.delenv(data_checks.DATA_DIR_ENV, raising=False)
    with pytest.raises(evdata.DataNotFound) as e:
        evdata.load_dataset_records("triviaqa", data_dir=tmp_path)
    msg = str(e.value)
    assert "explicit file path" in msg and str(tmp_path / "triviaqa/triviaqa_validation_2000.jsonl") in msg
    assert "hub" in msg and "mandarjoshi/trivia_qa" in msg and "FRANKENLAB_DATA_DIR" in msg
    with pytest.raises(evdata.DataNotFound) as e:
        evdata.load_dataset_records("nq-open")
    assert "none given" in str(e.value) and "nq_open/nq-open-oracle.jsonl.gz" in str(e.value)
    assert "no hub source" in str(e.value)
    with pytest.raises(evdata.DataNotFound, match="does not exist"):
        evdata.load_dataset_records("wikitext2", path=tmp_path / "missing.jsonl")
    with pytest.raises(evdata.DataNotFound, match="unknown dataset"):
        evdata.load_dataset_records("imagenet")


# -- the command line ---------------------------------------------------------------------------------


def test_eval_command_writes_json(tiny_model_dir, data_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    out = tmp_path / "res.json"
    rc = main(
        [
            "--device",
            "cpu",
            "eval",
            "--model",
            str(tiny_model_dir),
            "--ppl",
            "wikitext2-concat-64",
            "--limit",
            "2",
            "--triviaqa-closed",
            "3",
            "--samples",
            "--failures",
            "1",
            "--json",
            str(out),
            "--data-dir",
            str(data_dir),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert [m["protocol"] for m in res["metrics"]] == [
        "wikitext2-concat-64:first2",
        "triviaqa-closed-validation:3:first-line",
    ]
    assert len(res["details"]["triviaqa_closed"]["records"]) == 3 and res["details"]["samples"]["items"]
    printed = capsys.readouterr().out
    assert "wikitext2-concat-64:first2" in printed and "triviaqa-closed-validation:3:first-line" in printed
    wrong = [r for r in res["details"]["triviaqa_closed"]["records"] if not r["correct"]]
    assert not wrong or f"#{wrong[0]['index']}: {wrong[0]['question']}" in printed
    assert main(["eval", "--model", str(tiny_model_dir), "--ppl", "nonsense"]) == 2


# -- the bundled model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_perplexity_and_answers(data_dir):
    from frankenlab.pipeline.loading import load_model

    lm = load_model(device="cpu")
    r = perplexity(lm.model, lm.tokenizer, "wikitext2-concat-512", data_dir=data_dir, limit=4)
    assert r.protocol == "wikitext2-concat-512:first4" and r.tokens == 4 * 511
    assert 8 < r.value < 40  # a trained 135M model, far from uniform (49152) and from a memorised 1
    qa = run_qa(lm.model, lm.tokenizer, "closed", 4, data_dir=data_dir, batch_size=4)
    assert len(qa.records) == 4
    for rec in qa.records:  # real answers: one non-empty line, well before the 50-token cap
        assert rec["prediction"] and "\n" not in rec["prediction"] and rec["new_tokens"] < 50


def test_hub_cache_is_used_when_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(evdata, "_hub_reachable", lambda: False)
    monkeypatch.setattr(evdata, "_hub_cache_path", lambda info: tmp_path)
    monkeypatch.setattr(evdata, "_from_hub", lambda info, limit: [{"text": "cached"}])
    monkeypatch.delenv(data_checks.DATA_DIR_ENV, raising=False)
    assert evdata.load_texts("wikitext2", data_dir=tmp_path / "nothing") == (["cached"], "hf-cache:wikitext")


def test_triviaqa_rc_open_book_uses_shortest_evidence(tmp_path):
    from frankenlab.evals.qa import parse_triviaqa_rc

    row = {
        "question": "Who created The Chipmunks?",
        "answer": {"value": "Ross Bagdasarian", "aliases": ["David Seville"]},
        "entity_pages": {"wiki_context": ["A long page about Alvin and the Chipmunks. " * 20]},
        "search_results": {"search_context": ["", "The Chipmunks were created by Ross Bagdasarian."]},
    }
    f = tmp_path / "rc.jsonl"
    f.write_text(json.dumps(row) + "\n")
    items, source, total = load_items("open", 1, path=f, open_source="triviaqa-rc")
    assert items[0].context == "The Chipmunks were created by Ross Bagdasarian."
    assert items[0].aliases == ("Ross Bagdasarian", "David Seville") and source == str(f)
    assert protocol_name("open", 1, 0, False, 1, "triviaqa-rc") == "triviaqa-rc-openbook-validation:1:first-line"
    with pytest.raises(ValueError, match="no evidence"):
        parse_triviaqa_rc({**row, "entity_pages": {}, "search_results": {}}, 3)


@pytest.mark.parametrize("match", ["first-line", "thesis"])
def test_eval_command_match_protocols(tiny_model_dir, data_dir, tmp_path, capsys, match):
    from frankenlab.tui.cli.main import main

    out = tmp_path / f"{match}.json"
    assert (
        main(
            [
                "--device",
                "cpu",
                "eval",
                "--model",
                str(tiny_model_dir),
                "--triviaqa-closed",
                "3",
                "--match",
                match,
                "--qa-batch-size",
                "3",
                "--json",
                str(out),
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    (m,) = res["metrics"]
    assert m["protocol"] == f"triviaqa-closed-validation:3:{match}" and m["match"] == match
    assert res["config"]["match"] == match and m["n"] == 3 and len(m["ci95"]) == 2
    records = res["details"]["triviaqa_closed"]["records"]
    if match == "thesis":  # the whole answer: generation ran past newlines, the record keeps the first line's verdict
        assert all("first_line_correct" in r for r in records)
        assert any("\n" in r["generated"].strip() or r["new_tokens"] == 50 for r in records)
    else:
        assert all("\n" not in r["prediction"] for r in records)
    assert f"triviaqa-closed-validation:3:{match}" in capsys.readouterr().out


def test_eval_command_question_file_is_named_in_the_protocol(tiny_model_dir, data_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    qs = tmp_path / "pub_quiz.jsonl"
    qs.write_text(
        "".join(
            json.dumps({"question": q, "answer": a, "aliases": [a]}) + "\n"
            for q, a in [("Capital of France?", "Paris"), ("Who wrote Hamlet?", "Shakespeare")]
        )
    )
    out = tmp_path / "quiz.json"
    assert (
        main(
            [
                "--device",
                "cpu",
                "eval",
                "--model",
                str(tiny_model_dir),
                "--triviaqa-closed",
                "2",
                "--triviaqa-file",
                str(qs),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    (m,) = json.loads(out.read_text())["metrics"]
    assert m["protocol"] == "triviaqa-closed-pub_quiz:2:first-line" and m["source"] == str(qs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no question here"}) + "\n")
    capsys.readouterr()
    assert (
        main(
            [
                "--device",
                "cpu",
                "eval",
                "--model",
                str(tiny_model_dir),
                "--triviaqa-closed",
                "1",
                "--triviaqa-file",
                str(bad),
            ]
        )
        == 2
    )
    printed = capsys.readouterr().out
    assert f'{bad}:1: the row has no "question"' in printed and "Traceback" not in printed  # file and line


def test_thesis_preset_expands_and_keys_beside_it_win():
    from frankenlab.evals.config import from_dict, to_dict
    from frankenlab.tui.cli.eval import build_config
    from frankenlab.tui.cli.main import build_parser

    cfg = from_dict(EvalConfig, {"preset": "thesis"}, "evaluation")
    assert (cfg.perplexity, cfg.ppl_limit, cfg.triviaqa_closed, cfg.triviaqa_open, cfg.match, cfg.samples) == (
        ("wikitext2-rows-512",),
        0,
        1200,
        1200,
        "thesis",
        True,
    )
    assert from_dict(EvalConfig, {"preset": "thesis", "triviaqa_open": 0}, "evaluation").triviaqa_open == 0
    again = from_dict(EvalConfig, to_dict(cfg), "evaluation")
    assert again == cfg  # dumped and reloaded, the same evaluation
    args = build_parser().parse_args(["eval", "--preset", "thesis", "--triviaqa-open", "0"])
    assert build_config(args) == from_dict(EvalConfig, {"preset": "thesis", "triviaqa_open": 0}, "evaluation")
    with pytest.raises(ValueError, match="unknown evaluation preset"):
        from_dict(EvalConfig, {"preset": "paper"}, "evaluation")
    plain = build_config(build_parser().parse_args(["eval"]))
    assert plain.perplexity == ("wikitext2-rows-512", "wikitext2-concat-512") and plain.ppl_limit == 0
