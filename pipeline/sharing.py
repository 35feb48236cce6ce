"""Who may touch a shared model: one re-entrant lock per model object.

The lab holds one loaded model that several threads borrow: a chat reply, a what-if estimate,
the memory panel's footprint, the run's copy of the baseline. `planned(model, plan)` swaps the
model's layer list (and its config's depth) while it runs, so anyone else reading the model
meanwhile would run or count the wrong layers. The rule: use a model that others may also use
only while holding `model_lock(model)`. `planned` takes it itself, as do the estimator while it
computes and `pipeline.footprint.footprint`; re-entrant, so a holder may call them.

Locks are kept in a `WeakKeyDictionary` keyed by the model object, so a model that is garbage
collected takes its lock with it, and a new model at a reused address gets its own (keys by
`id(model)` did neither). Not an attribute on the model: `copy.deepcopy` of a model (the runner
copies the lab's) cannot copy a lock. An RLock must be released by the thread that took it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from frankenlab.evals.cancel import Cancelled

_LOCKS: weakref.WeakKeyDictionary[object, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()
POLL_SECONDS = 0.05


def model_lock(model) -> threading.RLock:
    """The one lock of `model` (created on first use); hold it while using the model."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def borrowed(model, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold `model_lock(model)`; while waiting for it, give up with `Cancelled` once `cancelled()` is true."""
    lock = model_lock(model)
    if cancelled is None:
        lock.acquire()
    else:
        while not lock.acquire(timeout=POLL_SECONDS):
            if cancelled():
                raise Cancelled("cancelled while waiting for the model")
    try:
        yield
    finally:
        lock.release()
