"""The evaluation a run performs after each stage, as configured in a recipe's [evaluation] table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.config import require

from .perplexity import Protocol, perplexity

WHEN = ("each", "last", "none")


@dataclass(frozen=True)
class EvalConfig:
    perplexity: tuple[str, ...] = ("wikitext2-concat-512",)  # protocol names
    ppl_limit: int | None = 32  # rows/windows per protocol; None or 0 = the whole split
    batch_size: int = 4
    triviaqa_closed: int = 0  # questions; 0 = skip
    triviaqa_open: int = 0
    qa_seed: int = 0
    qa_batch_size: int = 8
    chat_template: bool = False  # wrap QA prompts in the model's chat template
    samples: bool = True  # greedy generation samples on fixed prompts
    after: str = "each"  # evaluate after each stage, only the last, or never

    def __post_init__(self):
        for p in self.perplexity:
            try:
                Protocol.parse(p)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        require(self.after in WHEN, f"evaluation.after must be one of {', '.join(WHEN)}")
        require(self.batch_size >= 1 and self.qa_batch_size >= 1, "batch sizes must be at least 1")
        require(self.triviaqa_closed >= 0 and self.triviaqa_open >= 0, "question counts cannot be negative")
        require(self.ppl_limit is None or self.ppl_limit >= 0, "ppl_limit cannot be negative")


@dataclass
class EvalResult:
    metrics: list[dict] = field(default_factory=list)  # {"name", "value", "protocol", ...}
    details: dict = field(default_factory=dict)  # per-question records, generation samples

    def get(self, name: str) -> dict | None:
        return next((m for m in self.metrics if m["name"] == name), None)


def evaluate(model, tokenizer, config: EvalConfig, *, data_dir=None,
             progress: Callable[[float, str], None] | None = None,
             cancelled: Callable[[], bool] | None = None,
             on_metric: Callable[[dict], None] | None = None) -> EvalResult:
    result = EvalResult()
    jobs = len(config.perplexity)
    for j, proto in enumerate(config.perplexity):
        def prog(f, j=j, proto=proto):
            if progress:
                progress((j + f) / jobs, f"perplexity {proto}")
        r = perplexity(model, tokenizer, Protocol.parse(proto, limit=config.ppl_limit or None), data_dir=data_dir,
                       batch_size=config.batch_size, progress=prog, cancelled=cancelled)
        m = {"name": "perplexity", "value": r.value, "protocol": r.protocol, "tokens": r.tokens,
             "seconds": r.seconds}
        result.metrics.append(m)
        if on_metric:
            on_metric(m)
    return result
