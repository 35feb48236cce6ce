"""The what-if scheduler between the TUI's thread workers and the estimator: latest toggle wins."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from frankenlab.evals.cancel import Cancelled
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.whatif.estimator import CancelFn, Estimate, WhatIfEstimator


class EstimateScheduler:
    """ "Latest wins" for the TUI: every submit (or scan) makes all earlier ones stale.

    Call `submit(plan)` from a thread worker; it blocks until the estimate is ready and returns it,
    or raises `evals.perplexity.Cancelled` once a newer submit, scan or `cancel()` has superseded
    it (within one decoder layer's time). Estimates run one at a time; a stale one gives up the
    model at its next layer boundary, and whatever it computed stays cached. Known plans are
    answered without waiting for a running estimate.

    Which request is newest is decided where the requests are made, not in the workers: the TUI
    takes a `ticket()` on its main thread when the key is handled and hands it to `submit(...,
    ticket=)` / `scan(..., ticket=)`. A ticket taken inside a worker (no `ticket=`) is only as
    ordered as the workers happen to start, so an older request could take a newer ticket.
    """

    def __init__(self, estimator: WhatIfEstimator):
        self.estimator = estimator
        self._generation = 0
        self._mutex = threading.Lock()
        self._running = threading.Lock()
        # every computation runs on this one long-lived thread: torch's OpenMP team is then built once
        # and stays warm (a fresh thread per request measured ~8-18 % slower on 2 cores)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whatif")

    def _on_thread(self, fn, *args, **kwargs):
        return self._thread.submit(fn, *args, **kwargs).result()

    def ticket(self) -> int:
        """A new request's ticket: every earlier one is stale from now on (take it where requests are ordered)."""
        with self._mutex:
            self._generation += 1
            return self._generation

    def is_current(self, ticket: int) -> bool:
        return ticket == self._generation

    def cancel(self) -> None:
        """Make whatever is running or waiting stale (e.g. the screen closes)."""
        self.ticket()

    def prepare(self, cancelled: CancelFn = None) -> None:
        """The estimator's baseline pass on the scheduler's thread (the lab warms up with it)."""
        self._on_thread(self.estimator.prepare, cancelled)

    def _stale_fn(self, ticket: int, cancelled: CancelFn) -> Callable[[], bool]:
        return lambda: ticket != self._generation or bool(cancelled and cancelled())

    def _acquire(self, stale: Callable[[], bool]) -> None:
        while not self._running.acquire(timeout=0.02):
            if stale():
                raise Cancelled("superseded by a newer what-if request")
        if stale():
            self._running.release()
            raise Cancelled("superseded by a newer what-if request")

    def submit(
        self,
        plan: LayerPlan,
        cancelled: CancelFn = None,
        on_partial: Callable[[Estimate], None] | None = None,
        *,
        ticket: int | None = None,
        record: bool = True,
    ) -> Estimate:
        """The plan's exact estimate; with `on_partial`, its first answer from part of the slice before it.

        `ticket`: this request's place in line, from `ticket()` (a fresh one when None). A request
        whose ticket is no longer the newest raises `Cancelled`, memo answers included.
        `on_partial` runs on the estimator's thread and only while this request is the newest.
        `record=False` keeps the plan's states out of the cache (side estimates, as the scan's).
        """
        stale = self._stale_fn(self.ticket() if ticket is None else ticket, cancelled)
        if stale():
            raise Cancelled("superseded by a newer what-if request")
        hit = self.estimator.known(plan)
        if hit is not None:
            est = self.estimator.estimate(plan)  # memo answer with restarted_at/seconds filled in
            if stale():
                raise Cancelled("superseded by a newer what-if request")
            return est

        def partial(est: Estimate) -> None:
            if not stale():
                on_partial(est)

        self._acquire(stale)
        try:
            return self._on_thread(
                self.estimator.estimate,
                plan,
                stale,
                record=record,
                on_partial=None if on_partial is None else partial,
            )
        finally:
            self._running.release()

    def scan(
        self,
        cancelled: CancelFn = None,
        layers: Iterable[int] | None = None,
        *,
        coarse_first: bool = False,
        ticket: int | None = None,
    ) -> Iterator[tuple[int, Estimate]]:
        """The estimator's scan, one layer at a time under the same latest-wins rule (`ticket` as in `submit`).

        With `coarse_first`, every layer's first answer (from part of the slice) comes before
        every layer's exact one, so the grid fills in a fraction of the time, then sharpens.
        """
        stale = self._stale_fn(self.ticket() if ticket is None else ticket, cancelled)
        self._acquire(stale)
        try:
            self._on_thread(self.estimator.prepare, stale)
            n = self.estimator.n_layers
            parts = self.estimator.parts
        finally:
            self._running.release()
        if n < 2:
            return
        order = list(reversed(range(n))) if layers is None else list(layers)
        passes = [True, False] if coarse_first and parts > 1 else [False]
        for coarse in passes:
            for i in order:
                plan = LayerPlan.without(n, [i])
                if self.estimator.known(plan) is None:
                    self._acquire(stale)
                    try:
                        est = (
                            self._on_thread(self.estimator.estimate_first, plan, stale)
                            if coarse
                            else self._on_thread(self.estimator.estimate, plan, stale, record=False)
                        )
                    finally:
                        self._running.release()
                else:
                    est = self.estimator.estimate(plan)
                if stale():
                    raise Cancelled("superseded by a newer what-if request")
                yield i, est
