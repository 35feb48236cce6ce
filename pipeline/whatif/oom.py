"""Out of memory in the what-if estimator: one retry with half the state cache, then one line.

Split out of `estimator` because recovering from an out-of-memory error is a job of its own, apart
from computing estimates: `retry_on_oom` wraps every public entry of `WhatIfEstimator` (estimate,
first answer, the scan's baseline pass), frees what the estimator holds, halves its cache budget
and retries once; a second failure raises `WhatIfOutOfMemory` with what to lower.
"""

from __future__ import annotations

from collections.abc import Callable

from frankenlab.evals import devices


class WhatIfOutOfMemory(RuntimeError):
    """An estimate ran out of memory twice (the second time with half the cache): one line, what to lower."""


def retry_on_oom(estimator, run: Callable[[], object]):
    """`run()` on `estimator` (a `WhatIfEstimator`, not imported: it imports this); after an out of
    memory, once more with half the state cache (cached states are recomputed), then one line that
    says what to lower."""
    for attempt in range(2):
        try:
            return run()
        except Exception as exc:
            if not devices.is_oom(exc):
                raise
            device = devices.model_device(estimator.model)
            with estimator._lock:
                if attempt == 0:
                    estimator._cache.max_bytes = max(0, (estimator._cache.max_bytes or estimator._cache.held) // 2)
                estimator.reset()
            devices.free_cached_memory(device)
            if attempt == 1:
                raise WhatIfOutOfMemory(
                    devices.oom_message(
                        device,
                        "in the what-if estimate",
                        f"lower its slice (samples {estimator.samples}, seq_len {estimator.seq_len}), its batch size "
                        f"({estimator.batch_size}) or its cache (now {estimator._cache.max_bytes} bytes)",
                    )
                ) from None
