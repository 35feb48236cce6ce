"""What-if layer skipping: perplexity of a layer plan on a small fixed slice, fast enough to toggle.

The lab's first question is "what does this layer cost?". Answering it with a full perplexity
pass per toggle takes seconds to minutes, so the estimator scores a small fixed slice (by default
the first 4 windows of 256 tokens of WikiText-2 test, joined as in `wikitext2-concat-256:first4`)
and reuses work, all of it exactly:
- `estimator`: `WhatIfEstimator` restarts a plan from the cached hidden state of the longest
  prefix it shares with the unmodified model or a recently estimated plan; a plan estimated once
  answers instantly (`known`), e.g. toggling a cell back; cancelled work stays cached.
- `cache`: which states are kept inside `max_cache_bytes` (checkpoints every k-th position when
  the baseline does not fit, recent plans least recently used first out).
- `scheduler`: `EstimateScheduler`, "latest toggle wins" for the TUI's thread workers.
- `oom`: after an out of memory, one retry with half the cache, then one line that says what to lower.
- `progressive`: the first answer from the slice's first sample (its coverage and standard error)
  that a toggle shows while the rest of the slice refines it to the exact number.

The leave-one-out `scan` is the depth stage's perplexity importance metric (that stage calls it),
so the grid's heat colours and the layers depth pruning removes agree by construction.

Final numbers are exact, not approximations: an estimate equals a full forward of the planned
model through the evaluation code up to float summation order (`benchmarks/bench_whatif.py` times both;
tests check it for every kind of plan).
"""

from frankenlab.pipeline.whatif.estimator import DEFAULT_CACHE_BYTES, CancelFn, Estimate, WhatIfEstimator
from frankenlab.pipeline.whatif.scheduler import EstimateScheduler

__all__ = ["DEFAULT_CACHE_BYTES", "CancelFn", "Estimate", "EstimateScheduler", "WhatIfEstimator"]
