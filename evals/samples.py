"""Greedy generation samples on fixed prompts, stored with every evaluation.

The same prompts for every model and stage, so configurations can be compared by eye (the
thesis' appendix does this with the Chipmunks question). Greedy, so a sample only changes when the
model does. Samples stop at end-of-sequence or after `max_new_tokens`, not at a newline. Each
sample carries its degeneration metrics (`evals.degeneration`: non-ASCII share, distinct-2, the
longest repeated n-gram run), and the set a summary of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from frankenlab.evals.degeneration import degeneration, summary
from frankenlab.evals.generate import generate_greedy

PROMPTS: tuple[str, ...] = (
    "Question: Who was the man behind The Chipmunks?\nAnswer:",
    "Question: What is the capital of France?\nAnswer:",
    "Question: Which planet is known as the Red Planet?\nAnswer:",
    "The history of the Roman Empire",
    "Once upon a time, in a small village,",
)
MAX_NEW_TOKENS = 40


def generation_samples(
    model,
    tokenizer,
    prompts: tuple[str, ...] | list[str] = PROMPTS,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict:
    t0 = time.perf_counter()
    gens = generate_greedy(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=max_new_tokens,
        stop_at_newline=False,
        batch_size=batch_size,
        progress=progress,
        cancelled=cancelled,
    )
    return {
        "protocol": f"greedy:{max_new_tokens}",
        "seconds": time.perf_counter() - t0,
        "items": [
            {"prompt": g.prompt, "output": g.text, "new_tokens": g.new_tokens, "degeneration": degeneration(g.text)}
            for g in gens
        ],
        "degeneration": summary([g.text for g in gens]),
    }
