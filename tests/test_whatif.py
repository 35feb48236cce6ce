import threading

import pytest
import torch

from benchmarks.bench_whatif import naive_estimate  # the naive full recompute, the reference
from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.head import blocked_nll
from frankenlab.evals.perplexity import perplexity
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.plans import LayerPlan, PlanError, planned
from frankenlab.pipeline.sharing import model_lock
from frankenlab.pipeline.stages import depth
from frankenlab.pipeline.whatif import EstimateScheduler, WhatIfEstimator

PLANS = [
    "0-2,4-7",  # one skip
    "1-7",  # skip layer 0
    "0-3,3,3,4-7",  # a repeat
    "1,1,2,5,5,7",  # skips and repeats, layer 0 skipped
    "7,6,5,4,3,2,1,0",  # reversed
    "0-6",  # last layer skipped: the head runs straight on a cached state
]


def _ids(tiny, n=3, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tiny.tokenizer), (n, t), generator=g)


def _est(tiny, **kw):
    kw.setdefault("ids", _ids(tiny))
    return WhatIfEstimator(tiny.model, tiny.tokenizer, **kw)


@pytest.mark.parametrize("spec", PLANS)
def test_cached_estimate_equals_full_recompute(tiny, spec):
    est = _est(tiny)
    plan = LayerPlan.parse(spec, 8)
    fast, naive = est.estimate(plan), naive_estimate(est, plan)
    assert fast.cached and not naive.cached
    assert fast.ppl == pytest.approx(naive.ppl, rel=1e-5)
    assert fast.delta == pytest.approx(naive.delta, rel=1e-4, abs=1e-6)
    assert fast.restarted_at == plan.common_prefix(LayerPlan.identity(8))
    assert fast.layers_run == len(plan) - fast.restarted_at
    assert fast.plan_text == plan.to_text() and fast.protocol == "ids-3x40"


def test_baseline_and_delta(tiny):
    est = _est(tiny)
    ident = est.estimate(LayerPlan.identity(8))
    assert ident.delta == 0 and ident.ppl == est.baseline_ppl
    assert est.baseline_ppl == pytest.approx(naive_estimate(est, LayerPlan.identity(8)).ppl, rel=1e-5)
    e = est.estimate(LayerPlan.without(8, [4]))
    assert e.delta == pytest.approx(e.ppl - est.baseline_ppl) and e.baseline == pytest.approx(est.baseline_ppl)


@pytest.mark.parametrize("budget", [0, 1, "three"])
def test_bounded_cache_checkpoints_give_the_same_numbers(tiny, budget):
    ids = _ids(tiny)
    full = _est(tiny, ids=ids, max_cache_bytes=None)
    full.prepare()
    per_state = full.cache_report()["state_bytes"]
    kwargs_bytes = full.cache_bytes - 8 * per_state
    limit = {0: 0, 1: kwargs_bytes + per_state, "three": kwargs_bytes + 3 * per_state}[budget]
    small = _est(tiny, ids=ids, max_cache_bytes=limit)
    for spec in PLANS:
        plan = LayerPlan.parse(spec, 8)
        assert small.estimate(plan).ppl == pytest.approx(full.estimate(plan).ppl, rel=1e-5)
        assert small.cache_bytes <= max(limit, kwargs_bytes)
    report = small.cache_report()
    if budget == "three":
        assert report["stride"] == 3 and report["baseline_positions"] == 3  # inputs of layers 0, 3, 6
        # skipping layer 5 restarts from the checkpoint at 3 (layers 3, 4 recomputed)
        assert small.estimate(LayerPlan.without(8, [5]), use_memo=False, record=False).restarted_at == 3
    if budget == 0:
        assert report["stride"] is None and report["baseline_positions"] == 0
        assert not small.estimate(LayerPlan.without(8, [6])).cached
    assert full.cache_report()["stride"] == 1 and full.cache_report()["baseline_positions"] == 8


def test_cache_bytes_counts_the_baseline_states(tiny):
    est = _est(tiny, ids=_ids(tiny, n=3, t=40))
    est.prepare()
    hidden = tiny.model.config.hidden_size
    states = 8 * 3 * 40 * hidden * 4  # inputs of 8 layers, (3, 40, hidden) fp32 each
    assert states <= est.cache_bytes < states * 1.1  # + rotary tables
    for i in range(12):  # recent plans are capped in number even without a byte budget
        est.estimate(LayerPlan.without(8, [i % 8]) if i < 8 else LayerPlan.without(8, [0, i - 7]))
    assert est.cache_report()["plans"] <= 8


def test_recent_plans_are_restart_points(tiny):
    est = _est(tiny)
    first = LayerPlan.without(8, [2])
    est.estimate(first)
    # editing further down the same plan restarts after the edit, not at the first skip
    second = LayerPlan.without(8, [2, 6])
    e = est.estimate(second)
    assert e.restarted_at == 5 and e.layers_run == 1  # positions 0..4 = layers 0,1,3,4,5
    assert e.ppl == pytest.approx(naive_estimate(est, second).ppl, rel=1e-5)
    assert est.cache_report()["plans"] >= 1


def test_recent_plans_respect_the_budget(tiny):
    ids = _ids(tiny)
    probe = _est(tiny, ids=ids)
    probe.prepare()
    budget = probe.cache_bytes + 2 * probe.cache_report()["state_bytes"]  # the baseline plus two more states
    est = _est(tiny, ids=ids, max_cache_bytes=budget)
    for i in range(1, 7):
        est.estimate(LayerPlan.without(8, [i]))
        assert est.cache_bytes <= budget
    # the most recent plan keeps its states, older ones were evicted first
    assert est.cache_report()["plans"] >= 1


def test_memo_answers_known_plans(tiny):
    est = _est(tiny)
    plan = LayerPlan.parse("0-3,3,4-7", 8)
    assert est.known(plan) is None
    first = est.estimate(plan)
    again = est.estimate(plan)
    assert est.known(plan).ppl == first.ppl == again.ppl
    assert again.layers_run == 0 and again.restarted_at == len(plan)


def test_cancel_raises_and_keeps_partial_work(tiny):
    est = _est(tiny)
    est.prepare()
    calls = {"n": 0}

    def after_three():
        calls["n"] += 1
        return calls["n"] > 3

    plan = LayerPlan.without(8, [1])
    with pytest.raises(Cancelled):
        est.estimate(plan, cancelled=after_three)
    assert est.known(plan) is None
    e = est.estimate(plan)  # resumes from the states computed before the cancel
    assert e.restarted_at > 1
    assert e.ppl == pytest.approx(naive_estimate(est, plan).ppl, rel=1e-5)


def test_cancelled_prepare_resumes(tiny):
    est = _est(tiny)
    calls = {"n": 0}

    def after_four():
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(Cancelled):
        est.prepare(after_four)
    assert not est.ready
    est.prepare()
    ref = _est(tiny)
    ref.prepare()
    assert est.baseline_ppl == pytest.approx(ref.baseline_ppl, rel=1e-6)


def test_plans_for_another_depth_or_a_planned_model_are_refused(tiny):
    est = _est(tiny)
    with pytest.raises(PlanError, match="the plan is for 6 layers"):
        est.estimate(LayerPlan.identity(6))
    with planned(tiny.model, LayerPlan.without(8, [3])):
        with pytest.raises(PlanError, match="restore it"):
            _est(tiny).prepare()


def _slow_layers(model, delay, started: threading.Event):
    def hook(*_):
        started.set()
        threading.Event().wait(delay)

    return [layer.register_forward_pre_hook(hook) for layer in decoder_layers(model)]


def test_scheduler_newest_submit_wins(tiny):
    est = _est(tiny)
    est.prepare()
    sched = EstimateScheduler(est)
    started = threading.Event()
    handles = _slow_layers(tiny.model, 0.05, started)
    outcome = {}

    def stale_job():
        try:
            outcome["stale"] = sched.submit(LayerPlan.without(8, [0]))
        except Cancelled:
            outcome["stale"] = "cancelled"

    worker = threading.Thread(target=stale_job)
    try:
        worker.start()
        assert started.wait(10)
        newest = sched.submit(LayerPlan.without(8, [6]))
        worker.join(10)
    finally:
        for h in handles:
            h.remove()
    assert outcome["stale"] == "cancelled"
    assert newest.ppl == pytest.approx(naive_estimate(est, LayerPlan.without(8, [6])).ppl, rel=1e-5)
    assert est.known(LayerPlan.without(8, [0])) is None


def test_scheduler_cancel_stops_a_scan_and_a_rescan_resumes(tiny):
    est = _est(tiny)
    sched = EstimateScheduler(est)
    seen = []
    with pytest.raises(Cancelled):
        for i, _e in sched.scan():
            seen.append(i)
            if len(seen) == 3:
                sched.cancel()
    assert seen == [7, 6, 5]
    resumed = dict(sched.scan())
    assert sorted(resumed) == list(range(8))
    assert all(resumed[i].layers_run == 0 for i in seen)  # known from the interrupted scan


def _ctx(tiny):
    return StageContext(tokenizer=tiny.tokenizer, device=torch.device("cpu"))


def test_scan_agrees_with_the_depth_metric(tiny):
    ids = _ids(tiny, n=4, t=48, seed=1)
    est = _est(tiny, ids=ids)
    scan = {i: e.ppl for i, e in est.scan()}
    metric = depth.perplexity_scores(tiny.model, ids, list(range(8)), _ctx(tiny))
    assert sorted(scan, key=scan.get) == sorted(metric, key=metric.get)
    assert scan == pytest.approx(metric, rel=1e-6)
    # and both are the plain leave-one-out perplexity
    naive = {i: naive_estimate(est, LayerPlan.without(8, [i])).ppl for i in range(8)}
    assert sorted(naive, key=naive.get) == sorted(scan, key=scan.get)
    assert naive == pytest.approx(scan, rel=1e-5)


def test_depth_metric_is_cancellable(tiny):
    ctx = _ctx(tiny)
    ctx.cancel_event.set()
    with pytest.raises(Cancelled):
        depth.perplexity_scores(tiny.model, _ids(tiny), [2, 3], ctx)


def test_default_slice_is_the_named_concat_protocol(tiny, data_dir):
    est = WhatIfEstimator(tiny.model, tiny.tokenizer, samples=3, seq_len=32, data_dir=data_dir)
    est.prepare()
    assert est.protocol == "wikitext2-concat-32:first3" and tuple(est.ids.shape) == (3, 32)
    ref = perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-32", limit=3, data_dir=data_dir)
    assert ref.protocol == est.protocol
    assert est.baseline_ppl == pytest.approx(ref.value, rel=1e-5)
    assert est.tokens == ref.tokens


@pytest.mark.parametrize("bias", [False, True])
def test_blocked_loss_equals_cross_entropy(bias):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g) * 3  # 6 blocks of 150 and one of 100
    b = torch.randn(1000, generator=g) if bias else None
    labels = torch.randint(0, 1000, (37,), generator=g)
    want = float(F.cross_entropy(F.linear(x, w, b), labels, reduction="sum"))
    assert blocked_nll(x, w, b, labels, block=150) == pytest.approx(want, rel=1e-6)
    assert blocked_nll(x, w, b, labels, block=4096) == pytest.approx(want, rel=1e-6)


def test_the_estimator_borrows_the_model_lock(tiny):
    from tests.test_plans import _free_for_others

    est = _est(tiny)
    seen = []
    layer = decoder_layers(tiny.model)[5]
    handle = layer.register_forward_pre_hook(lambda *_: seen.append(_free_for_others(tiny.model)))
    try:
        est.estimate(LayerPlan.without(8, [4]))  # prepare() and the estimate both run layer 5
    finally:
        handle.remove()
    # prepare() and the estimate each run layer 5 on two batches: the first answer's sample and the rest
    assert len(seen) == 4 and not any(seen), "another thread could take the model while the estimator ran it"
    assert _free_for_others(tiny.model)

    # while someone else holds the model, an estimate waits, and a cancel ends the wait
    plan = LayerPlan.without(8, [2])
    asked, cancel, outcome = threading.Event(), threading.Event(), []

    def cancelled():
        asked.set()  # only the wait for the lock asks while the model is held elsewhere
        return cancel.is_set()

    def job():
        try:
            outcome.append(est.estimate(plan, cancelled))
        except Cancelled:
            outcome.append("cancelled")

    with model_lock(tiny.model):
        worker = threading.Thread(target=job)
        worker.start()
        assert asked.wait(30)
        assert not outcome, "the estimate ran while another thread held the model"
        cancel.set()
        worker.join(30)
    assert outcome == ["cancelled"] and est.known(plan) is None
    with model_lock(tiny.model):  # re-entrant: a holder may estimate
        assert est.estimate(plan).ppl == pytest.approx(naive_estimate(est, plan).ppl, rel=1e-5)


# -- progressive answers: a first answer from part of the slice, refined to the exact number ----------
def _nll_rows(est, plan, rows):
    """Summed NLL and count of `plan` on some rows of the slice, by the evaluation code (no reuse)."""
    from frankenlab.evals.perplexity import score_sequences

    with planned(est.model, plan):
        return score_sequences(est.model, [(est.ids[r], 0) for r in rows])


@pytest.mark.parametrize("spec", ["1-7", "0-2,4-7", "0-3,3,3,4-7"])
def test_progressive_estimate_names_its_coverage_and_refines_to_the_naive_recompute(tiny, spec):
    import math

    est = _est(tiny)  # 3 samples of 40 tokens; the first answer rests on the first sample
    plan = LayerPlan.parse(spec, 8)
    partials = []
    final = est.estimate(plan, on_partial=partials.append)
    assert len(partials) == 1
    part = partials[0]
    assert not part.final and part.coverage == pytest.approx(39 / 117)
    assert (part.tokens, part.total_tokens, part.rows, part.total_rows) == (39, 117, 1, 3)
    assert part.coverage_text == "1/3 of the slice (39/117 tokens)"
    assert part.stderr is not None and math.isfinite(part.stderr) and part.stderr > 0
    # the first answer: the baseline's whole-slice NLL plus the plan-minus-baseline difference on sample 0
    plan_nll, n0 = _nll_rows(est, plan, [0])
    base_nll, _ = _nll_rows(est, LayerPlan.identity(8), [0])
    want = math.exp(est._baseline_nll[0] / 117 + (plan_nll - base_nll) / n0)
    assert part.ppl == pytest.approx(want, rel=1e-5)
    assert part.delta == pytest.approx(part.ppl - est.baseline_ppl)
    # the refined number is the exact one: equal to the naive full recompute and to a single pass
    assert final.final and final.stderr is None and final.coverage == 1.0
    assert final.coverage_text == "full slice (117 tokens)"
    assert final.ppl == pytest.approx(naive_estimate(est, plan).ppl, rel=1e-5)
    assert final.ppl == pytest.approx(est.estimate(plan, use_memo=False).ppl, rel=1e-6)
    assert est.known(plan).ppl == final.ppl


def test_first_part_is_not_computed_twice(tiny):
    est = _est(tiny)
    plan = LayerPlan.without(8, [2])
    first = est.estimate_first(plan)
    assert not first.final and first.rows == 1 and est.known(plan) is None
    runs = []
    handle = decoder_layers(tiny.model)[7].register_forward_pre_hook(lambda m, a: runs.append(a[0].shape[0]))
    partials = []
    try:
        final = est.estimate(plan, on_partial=partials.append)
    finally:
        handle.remove()
    assert runs == [2]  # only the other two samples ran through the last layer
    assert partials[0].ppl == first.ppl and partials[0].layers_run == 0  # the first answer came from the memo
    assert final.ppl == pytest.approx(naive_estimate(est, plan).ppl, rel=1e-5)


def test_one_sample_slice_answers_exactly_at_once(tiny):
    est = _est(tiny, ids=_ids(tiny, n=1))
    partials = []
    e = est.estimate(LayerPlan.without(8, [3]), on_partial=partials.append)
    assert partials == [] and e.final and e.coverage_text == "full slice (39 tokens)"


def test_scan_coarse_first_then_exact(tiny):
    est = _est(tiny)
    results = list(est.scan(coarse_first=True))
    assert [i for i, _ in results] == [7, 6, 5, 4, 3, 2, 1, 0] * 2
    coarse, exact = results[:8], results[8:]
    assert all(not e.final and e.coverage == pytest.approx(1 / 3) for _, e in coarse)
    assert all(e.final for _, e in exact)
    plain = dict((i, e.ppl) for i, e in _est(tiny).scan())
    assert dict((i, e.ppl) for i, e in exact) == pytest.approx(plain, rel=1e-6)


def test_scheduler_hands_out_the_first_answer_then_the_exact_one(tiny):
    est = _est(tiny)
    sched = EstimateScheduler(est)
    seen = []
    plan = LayerPlan.without(8, [0])
    final = sched.submit(plan, on_partial=seen.append)
    assert [e.final for e in seen] == [False]
    assert final.final and final.ppl == pytest.approx(naive_estimate(est, plan).ppl, rel=1e-5)
    coarse = [(i, e.final) for i, e in sched.scan(coarse_first=True)]
    assert coarse[:8] == [(i, i == 0) for i in range(7, -1, -1)]  # layer 0 is known exactly already
    assert all(final for _, final in coarse[8:])


def test_out_of_memory_shrinks_the_cache_and_retries_once(tiny, monkeypatch):
    from frankenlab.pipeline.whatif import estimator as estimator_module
    from frankenlab.pipeline.whatif.oom import WhatIfOutOfMemory

    plan = LayerPlan.parse("0-2,4-7", 8)
    want = _est(tiny).estimate(plan)
    est = _est(tiny, max_cache_bytes=1 << 20)
    real = estimator_module.WhatIfEstimator._compute
    calls = []

    def first_fails(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        return real(self, *a, **k)

    monkeypatch.setattr(estimator_module.WhatIfEstimator, "_compute", first_fails)
    got = est.estimate(plan)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5) and got.delta == pytest.approx(want.delta, rel=1e-4, abs=1e-6)
    assert est.max_cache_bytes == 1 << 19, "the cache budget was halved for the retry"

    def never_fits(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(estimator_module.WhatIfEstimator, "_compute", never_fits)
    with pytest.raises(WhatIfOutOfMemory) as err:
        est.estimate(LayerPlan.parse("1-7", 8))
    text = str(err.value)
    assert text.startswith("out of memory in the what-if estimate: lower its slice") and "\n" not in text
    assert est.max_cache_bytes == 1 << 18
