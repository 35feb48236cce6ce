"""How a model is measured (thesis, section 3.6). No Textual import anywhere below here.

- `perplexity`: perplexity under named protocols (`wikitext2-rows-512`, `wikitext2-concat-512`, ...).
- `qa`, `matching`, `generate`: TriviaQA closed book and an open-book task by batched greedy
  generation, and the thesis' answer-matching rule with strict exact match beside it.
- `samples`: greedy generation on fixed prompts, stored with every evaluation.
- `suite`: `EvalConfig` and `evaluate`, what the runner calls after each stage.
- `data`: where datasets come from (explicit file, data directory, Hugging Face hub or cache).
"""

import os as _os


def switched_off(env: str) -> bool:
    """True when the environment variable `env` says 0, false, no or off (a speed-up's off switch)."""
    return _os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off")
