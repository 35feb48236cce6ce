"""Batches scored side by side on a CPU: two at once, each on its share of the cores.

Every operation of a forward split over the cores makes the threads meet at its end, and the small
ones (norms, rotary, adds, softmax tiles) are mostly meeting; two batches side by side, one core
each, meet nowhere. `evals.perplexity.score_sequences` uses it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

from frankenlab.evals.cancel import Cancelled, cancel_between_layers

EVAL_WORKERS_ENV = "FRANKENLAB_EVAL_WORKERS"
_POOL_PREFIX = "frankenlab-eval"


def eval_workers(device: torch.device | str, batches: int) -> int:
    """Batches scored at once: on a CPU two, each on half the threads; elsewhere one.

    Measured on this project's 2-core machine (bundled model, 16-24 windows of 512 tokens,
    interleaved A/B in one process): with freed memory reused (`evals.malloc`) 1.09-1.15x the
    tokens per wall and per CPU second of one batch on both threads, the same NLL to 1e-9; without
    that, no gain (each thread's page faults ate it). `FRANKENLAB_EVAL_WORKERS=1` turns it off,
    `=N` asks for N (at most one per thread)."""
    if torch.device(device).type != "cpu" or batches < 2:
        return 1
    threads = torch.get_num_threads()
    raw = os.environ.get(EVAL_WORKERS_ENV, "").strip()
    if raw:
        try:
            return max(1, min(int(raw), threads, batches))
        except ValueError:
            pass
    return 2 if threads >= 2 else 1


def start_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """`workers` threads of `threads` intra-op threads each, for one evaluation.

    torch.set_num_threads also sets the count every thread started later begins with, so the
    threads are started and set up together and the caller's count is put back before anything
    else runs. The pool ends with its evaluation: idle threads that once ran torch work make
    libgomp count more threads than cores and spin less, which slowed later decoding on 2 cores
    from 4.1 to 3.0 questions/s while they lived."""
    caller = torch.get_num_threads()
    ready = threading.Barrier(workers)
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix=_POOL_PREFIX, initializer=torch.set_num_threads, initargs=(threads,)
    )
    try:
        for f in [pool.submit(ready.wait, 60) for _ in range(workers)]:  # every thread up and set
            f.result()
    except BaseException:
        pool.shutdown(wait=True)
        raise
    finally:
        torch.set_num_threads(caller)
    return pool


def _one(score, ids, labels, stopped: Callable[[], bool]) -> tuple[float, int]:
    if stopped():
        raise Cancelled("perplexity cancelled")
    return score(ids, labels)


def in_pool_thread() -> bool:
    """True on one of our worker threads (a nested evaluation there must not wait on a pool)."""
    return threading.current_thread().name.startswith(_POOL_PREFIX)


def score_side_by_side(
    model,
    batches,
    results,
    score,
    workers: int,
    rows: int,
    progress: Callable[[float], None] | None,
    cancelled: Callable[[], bool] | None,
) -> None:
    """`score(ids, labels)` of each (ids, labels) batch, `workers` in flight at once on a pool of
    threads, results stored by batch index. The first error stops the others between layers; once
    all have stopped a user's cancel is raised as `Cancelled`, otherwise the first real error (an
    out-of-memory, say)."""
    per = max(1, torch.get_num_threads() // workers)
    stop = threading.Event()

    def stopped() -> bool:
        return stop.is_set() or bool(cancelled and cancelled())

    pending, errors, nxt, done = {}, [], 0, 0
    with cancel_between_layers(model, stopped):  # held until the pool is down: a batch in flight can stop
        pool = start_pool(workers, per)
        try:
            while pending or (nxt < len(batches) and not errors):
                while not errors and nxt < len(batches) and len(pending) < workers:
                    ids, labels = batches[nxt]
                    pending[pool.submit(_one, score, ids, labels, stopped)] = nxt
                    nxt += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    if fut.exception() is not None:
                        stop.set()
                        errors.append(fut.exception())
                        continue
                    results[i] = fut.result()
                    done += batches[i][0].shape[0]
                    if progress and not errors:
                        progress(done / rows)
        finally:
            stop.set()  # a batch still in flight (a progress callback raised) stops at its next layer
            pool.shutdown(wait=True)
    if errors:
        if cancelled and cancelled():
            raise Cancelled("perplexity cancelled")
        real = [e for e in errors if not isinstance(e, Cancelled)]
        raise real[0] if real else errors[0]
