"""The evaluation a run performs after each stage, as configured in a recipe's [evaluation] table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import RecipeError, option, require

from .perplexity import Cancelled, Protocol, perplexity
from .qa import OPEN_SOURCES, run_qa
from .samples import generation_samples

WHEN = ("each", "last", "none")


@dataclass(frozen=True)
class EvalConfig:
    perplexity: tuple[str, ...] = option(
        ("wikitext2-concat-512",), help="protocols, comma separated: <data>-rows-<len> scores each row on its own "
                                        "(thesis), <data>-concat-<len> joins rows into windows (GPTQ/WANDA papers)")
    ppl_limit: int | None = option(32, label="ppl limit", help="rows or windows scored per protocol; empty or 0 = "
                                                                 "the whole split")
    ppl_stride: int | None = option(None, form=False, help="concat protocols: window stride; empty = the window "
                                                          "length (no overlap)")
    batch_size: int = option(4, form=False, help="sequences per forward when scoring perplexity")
    triviaqa_closed: int = option(0, label="TriviaQA closed", help="closed-book questions (\"Question: ... Answer:\"); "
                                                                   "0 = skip")
    triviaqa_open: int = option(0, label="TriviaQA open", help="open-book questions, a passage given with each; 0 = skip")
    qa_seed: int = option(0, form=False, help="seed that picks the questions")
    open_book: str = option("nq-open", form=False, choices=tuple(OPEN_SOURCES),
                            help="open-book source: nq-open (gold passages, local) or triviaqa-rc (hub)")
    qa_batch_size: int = option(8, form=False, help="questions answered per generate call")
    chat_template: bool = option(False, form=False, help="wrap QA prompts in the model's chat template")
    samples: bool = option(True, form=False, help="greedy generation samples on fixed prompts")
    after: str = option("each", label="evaluate", choices=WHEN,
                        help="each = after every stage, last = only after the last stage, none = never")

    def __post_init__(self):
        require(self.ppl_limit is None or self.ppl_limit >= 0, "ppl_limit cannot be negative")
        for p in self.perplexity:
            try:
                self.protocol(p)
            except ValueError as exc:
                raise RecipeError(str(exc)) from None
        require(self.after in WHEN, f"evaluation.after must be one of {', '.join(WHEN)}")
        require(self.batch_size >= 1 and self.qa_batch_size >= 1, "batch sizes must be at least 1")
        require(self.triviaqa_closed >= 0 and self.triviaqa_open >= 0, "question counts cannot be negative")
        require(self.ppl_limit is None or self.ppl_limit >= 0, "ppl_limit cannot be negative")
        require(self.open_book in OPEN_SOURCES, f"open_book must be one of {', '.join(OPEN_SOURCES)}")
        require(self.ppl_stride is None or self.ppl_stride >= 1, "ppl_stride must be at least 1")

    def protocol(self, name: str) -> Protocol:
        """A protocol name with this config's limit and (for concat protocols) stride applied."""
        proto = Protocol.parse(name, limit=self.ppl_limit or None)
        if self.ppl_stride and proto.mode == "concat":
            proto = Protocol.parse(name, limit=self.ppl_limit or None, stride=self.ppl_stride)
        return proto


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
    """Perplexity under each protocol, then TriviaQA closed / open book, then generation samples.

    Metrics: {"name": "perplexity" | "triviaqa_closed" | "triviaqa_open", "value", "protocol", ...};
    QA metrics carry the strict `exact_match`, the question count `n` and how many questions each
    matching rule decided. Per-question records and samples go to `details`.
    """
    result = EvalResult()
    jobs: list[tuple[str, Callable]] = []
    for proto in config.perplexity:
        jobs.append((f"perplexity {proto}", lambda prog, proto=proto: _perplexity(
            model, tokenizer, config, proto, data_dir, prog, cancelled)))
    for task, n, name in (("closed", config.triviaqa_closed, "triviaqa_closed"),
                          ("open", config.triviaqa_open, "triviaqa_open")):
        if n:
            jobs.append((f"{name} ({n} questions)", lambda prog, task=task, n=n, name=name: _qa(
                model, tokenizer, config, task, n, name, data_dir, prog, cancelled, result)))
    if config.samples:
        jobs.append(("generation samples", lambda prog: _samples(model, tokenizer, config, prog, cancelled, result)))
    for j, (label, job) in enumerate(jobs):
        def prog(f, j=j, label=label):
            if progress:
                progress((j + f) / len(jobs), label)
        if cancelled and cancelled():
            raise Cancelled("evaluation cancelled")
        prog(0.0)
        metric = job(prog)
        if metric is not None:
            result.metrics.append(metric)
            if on_metric:
                on_metric(metric)
    return result


def _perplexity(model, tokenizer, config, proto, data_dir, prog, cancelled) -> dict:
    r = perplexity(model, tokenizer, config.protocol(proto), data_dir=data_dir,
                   batch_size=config.batch_size, progress=prog, cancelled=cancelled)
    return {"name": "perplexity", "value": r.value, "protocol": r.protocol, "tokens": r.tokens,
            "sequences": r.sequences, "seconds": r.seconds, "source": r.source}


def _qa(model, tokenizer, config, task, n, name, data_dir, prog, cancelled, result) -> dict:
    r = run_qa(model, tokenizer, task, n, seed=config.qa_seed, batch_size=config.qa_batch_size,
               chat=config.chat_template, data_dir=data_dir, open_source=config.open_book, progress=prog,
               cancelled=cancelled)
    result.details[name] = {"protocol": r.protocol, "source": r.source, "accuracy": r.accuracy,
                            "exact_match": r.exact_match, "records": r.records}
    return {**r.metric(name), "source": r.source}


def _samples(model, tokenizer, config, prog, cancelled, result) -> None:
    result.details["samples"] = generation_samples(model, tokenizer, batch_size=config.qa_batch_size,
                                                   progress=prog, cancelled=cancelled)
    return None
