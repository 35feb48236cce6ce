"""The what-if line tells the truth: the number shown is the estimate of the plan shown, which is the grid's.

The estimator here is a fake that sleeps a random while between layers, so toggles, resets and a
model swap land while estimates are in flight, in every order the workers happen to run.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from frankenlab.evals.cancel import Cancelled
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.whatif import Estimate
from frankenlab.tui.widgets.whatif import alone, plan_short
from tests.test_tui import SIZE, make_app, wait_for

N = 8


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


class SlowEstimator:
    """Stands in for WhatIfEstimator: a known perplexity per plan, computed slowly and cancellably."""

    protocol = "fake-slice"
    max_cache_bytes = None
    cache_bytes = 0
    parts = 2

    def __init__(self, n: int = N, *, seed: int = 0, offset: float = 20.0, gate: threading.Event | None = None):
        self.n_layers, self.offset, self.gate = n, offset, gate
        self.ready = False
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.memo: dict[tuple[int, ...], Estimate] = {}
        self.started = threading.Event()  # set when an estimate begins computing
        self.baseline_ppl = self.value(LayerPlan.without(n, []))

    def value(self, plan: LayerPlan) -> float:
        c = plan.counts()
        return (
            self.offset
            + sum((i + 1) * 1.5 for i, k in enumerate(c) if k == 0)
            + sum(0.7 * (i + 2) * (k - 1) for i, k in enumerate(c) if k > 1)
        )

    def prepare(self, cancelled=None) -> None:
        self.ready = True

    def known(self, plan):
        return self.memo.get(plan.order)

    def _make(self, plan: LayerPlan, ppl: float, final: bool, layers_run: int = 3) -> Estimate:
        tokens = 100 if final else 50
        return Estimate(
            ppl, ppl - self.baseline_ppl, 0.01, 0, plan.to_text(), True, self.protocol, layers_run, tokens, 100, 2, 2,
            None if final else 0.5,
        )  # fmt: skip

    def _work(self, cancelled, steps: int = 3) -> None:
        for _ in range(steps):
            with self.lock:
                pause = self.rng.uniform(0.0, 0.04)
            time.sleep(pause)
            if cancelled is not None and cancelled():
                raise Cancelled("stale")

    def estimate(self, plan, cancelled=None, *, record=True, use_memo=True, on_partial=None):
        if use_memo and plan.order in self.memo:
            return self.memo[plan.order]
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        self._work(cancelled)
        if on_partial is not None:  # a first answer that is not the final number
            on_partial(self._make(plan, self.value(plan) * 1.1, final=False))
        self._work(cancelled)
        est = self._make(plan, self.value(plan), final=True)
        self.memo[plan.order] = est
        return est

    def estimate_first(self, plan, cancelled=None):
        return self.estimate(plan, cancelled)


def jitter_workers(app, seed: int) -> None:
    """Each worker thread resumes after a random delay once the screen took its update, as threads
    do on a loaded machine: requests ordered by the workers themselves would then race."""
    rng, real = random.Random(seed), app.call_from_thread

    def call_from_thread(callback, *args, **kwargs):
        result = real(callback, *args, **kwargs)
        time.sleep(rng.uniform(0.0, 0.15))
        return result

    app.call_from_thread = call_from_thread


async def settle(pilot, line):
    """The plan changes are handled and every estimate worker finished (their answers reach the
    screen before they finish); a line still "estimating" then would be a bug, and times out here."""
    await pilot.pause()
    await wait_for(
        pilot,
        lambda: (
            not [w for w in pilot.app.workers if w.group == "whatif" and not w.is_finished]
            and "estimating" not in str(line.render())
        ),
    )
    await pilot.pause()


def check_line(line, grid, fake) -> None:
    """The number shown is the estimate of the plan shown, and that plan is the grid's."""
    plan, text = grid.plan, str(line.render())
    if plan is None or plan.is_identity:
        assert line.shown is None and "ppl " not in text.replace("baseline ppl", ""), text
        return
    assert f"ppl {fake.value(plan):.2f} (" in text, (plan.to_text(), text)
    assert f"what-if {plan_short(plan)}: ppl {fake.value(plan):.2f}" in text, text
    shown_plan, est = line.shown
    assert shown_plan.order == plan.order and est.ppl == fake.value(plan)
    # every cell's number is its own change alone, never the plan's total
    for i in range(N):
        own = grid.own_delta(i)
        if own is not None and grid.counts[i] != 1:
            assert own == pytest.approx(fake.value(alone(plan, i)) - fake.baseline_ppl), (i, grid.counts)


async def test_bursts_of_toggles_never_show_another_plans_number(loaded, tmp_path, data_dir):
    fake = SlowEstimator()
    app = make_app(loaded, tmp_path, data_dir, whatif=True, estimator_factory=lambda lm, d: fake)
    async with app.run_test(size=SIZE) as pilot:
        grid, line = app.query_one("#grid"), app.query_one("#whatif")
        await wait_for(pilot, lambda: line.scheduler is not None and fake.ready)
        jitter_workers(app, 2)
        rng = random.Random(1)
        actions = {
            "right": lambda: grid.action_move(1, 0),
            "left": lambda: grid.action_move(-1, 0),
            "space": grid.action_toggle,
            "plus": lambda: grid.action_repeat(1),
            "minus": lambda: grid.action_repeat(-1),
        }
        for _ in range(12):
            # one burst, as keys arrive from a terminal in one read: every change is queued before any is handled
            for key in [rng.choice(["right", "right", "left", "space", "space", "plus", "minus"]) for _ in range(7)]:
                actions[key]()
            grid.action_toggle()
            await settle(pilot, line)
            check_line(line, grid, fake)
        await pilot.press("space", "right", "space", "right", "space")  # real keys, one by one
        await settle(pilot, line)
        check_line(line, grid, fake)
        # cells show their own effect: skip 2 alone, then repeat 3 alone, each cell its own number
        await pilot.press("0")
        grid.cursor = 2
        await pilot.press("space")
        await settle(pilot, line)
        await pilot.press("right", "plus")
        await settle(pilot, line)
        check_line(line, grid, fake)
        base = fake.baseline_ppl
        assert grid.own_delta(2) == pytest.approx(fake.value(LayerPlan.without(N, [2])) - base)
        assert grid.own_delta(3) == pytest.approx(fake.value(LayerPlan.from_counts([1, 1, 1, 2, 1, 1, 1, 1])) - base)


async def test_reset_clears_the_line_even_with_estimates_in_flight(loaded, tmp_path, data_dir):
    fake = SlowEstimator(seed=3)
    app = make_app(loaded, tmp_path, data_dir, whatif=True, estimator_factory=lambda lm, d: fake)
    async with app.run_test(size=SIZE) as pilot:
        grid, line = app.query_one("#grid"), app.query_one("#whatif")
        await wait_for(pilot, lambda: line.scheduler is not None and fake.ready)
        jitter_workers(app, 4)
        await pilot.press("right", "space")
        await settle(pilot, line)
        check_line(line, grid, fake)
        assert line.shown is not None
        await pilot.press("0")  # after a settled number
        await settle(pilot, line)
        check_line(line, grid, fake)
        assert "keeps every layer" in str(line.render())
        for _ in range(4):  # at the end of a burst, memo answers included
            for act in (grid.action_toggle, lambda: grid.action_move(1, 0), grid.action_toggle, grid.action_reset):
                act()
            await settle(pilot, line)
            check_line(line, grid, fake)
            await pilot.press("space", "0")
            await settle(pilot, line)
            check_line(line, grid, fake)


async def test_a_model_swap_makes_estimates_in_flight_unshowable(loaded, tmp_path, data_dir):
    gate = threading.Event()
    old, new = SlowEstimator(gate=gate), SlowEstimator(offset=50.0)
    fakes = iter([old, new])
    app = make_app(loaded, tmp_path, data_dir, whatif=True, estimator_factory=lambda lm, d: next(fakes))
    async with app.run_test(size=SIZE) as pilot:
        grid, line = app.query_one("#grid"), app.query_one("#whatif")
        await wait_for(pilot, lambda: line.scheduler is not None and old.ready)
        await pilot.press("right", "space")
        await wait_for(pilot, old.started.is_set)
        line.set_model(loaded, data_dir)  # the old model's estimate is still computing
        gate.set()
        await settle(pilot, line)
        assert line.shown is None and f"{old.value(grid.plan):.2f}" not in str(line.render())
        await pilot.press("e")  # estimated again: on the new model
        await settle(pilot, line)
        check_line(line, grid, new)
