"""The evaluation a run performs after each stage, as configured in a recipe's [evaluation] table.

Presets name whole evaluations: `preset = "thesis"` (or `frankenlab eval --preset thesis`) is the
thesis' section 3.6 protocol; keys given beside a preset override its values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.config import option, require
from frankenlab.evals.data import check_dataset, local_file
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.hellaswag import hellaswag
from frankenlab.evals.matching import MATCH_PROTOCOLS
from frankenlab.evals.perplexity import Protocol, is_file_protocol, perplexity
from frankenlab.evals.qa import OPEN_SOURCES, run_qa
from frankenlab.evals.samples import generation_samples

WHEN = ("each", "last", "none")
PRESETS: dict[str, dict] = {
    # thesis section 3.6: rows-512 perplexity on the whole WikiText-2 test split, 1,200 TriviaQA
    # questions closed and open book scored on the whole answer, and the generation samples
    "thesis": {
        "perplexity": ["wikitext2-rows-512"],
        "ppl_limit": 0,
        "triviaqa_closed": 1200,
        "triviaqa_open": 1200,
        "match": "thesis",
        "samples": True,
    },
}
PRESET_NOTES = {
    "thesis": "slow on a CPU: the whole WikiText-2 test split and 2 x 1,200 questions of up to 50 "
    "new tokens take hours there (minutes on a GPU); progress is shown throughout"
}


@dataclass(frozen=True)
class EvalConfig:
    perplexity: tuple[str, ...] = option(
        ("wikitext2-concat-512",),
        label="perplexity",
        help="perplexity protocols: <data>-rows-<len> (thesis) or <data>-concat-<len>",
    )
    ppl_limit: int | None = option(
        32, label="ppl limit", help="rows/windows scored per protocol; 0 or empty = the whole split"
    )
    ppl_stride: int | None = option(None, form=False, help="concat protocols: window stride; empty = no overlap")
    batch_size: int = option(4, form=False, help="perplexity batch, in full-length sequences")
    triviaqa_closed: int = option(0, label="TriviaQA closed", help="closed-book questions; 0 = skip")
    triviaqa_open: int = option(0, label="TriviaQA open", help="open-book questions; 0 = skip")
    match: str = option(
        "first-line",
        choices=MATCH_PROTOCOLS,
        label="match",
        help="what a QA answer is scored on: first-line (the answer's first line), thesis "
        "(the whole answer, up to 50 tokens; more lenient) or first-line-noecho (the first line; an "
        "answer that only repeats an alias the question contains does not count)",
    )
    triviaqa_file: str | None = option(
        None,
        form=False,
        help="closed-book questions from this file (question or "
        "context, answer, aliases) instead of the validation split",
    )
    qa_seed: int = option(0, form=False, help="which questions are sampled")
    open_book: str = option(
        "nq-open",
        form=False,
        choices=tuple(OPEN_SOURCES),
        help="open-book source: nq-open (gold passages, local) or triviaqa-rc (hub)",
    )
    qa_batch_size: int = option(8, form=False, help="questions generated together")
    chat_template: bool = option(False, form=False, help="wrap QA prompts in the model's chat template")
    hellaswag: int = option(0, label="HellaSwag", help="HellaSwag validation items (acc and acc_norm); 0 = skip")
    hellaswag_batch_size: int = option(16, form=False, help="HellaSwag (query, ending) rows per forward pass")
    samples: bool = option(
        True, form=False, help="greedy generation samples on fixed prompts, with degeneration metrics"
    )
    after: str = option(
        "each", label="evaluate", choices=WHEN, help="evaluate after each stage, only the last, or never"
    )
    preset: str = option(
        "",
        form=False,
        choices=("",) + tuple(PRESETS),
        help="a named evaluation (thesis: " + PRESET_NOTES["thesis"] + "); keys beside it override it",
    )

    def __post_init__(self):
        require(self.ppl_limit is None or self.ppl_limit >= 0, "ppl_limit cannot be negative")
        for p in self.perplexity:
            try:
                self.protocol(p)
            except ValueError as exc:
                raise RecipeError(str(exc)) from None
        require(self.after in WHEN, f"evaluation.after must be one of {', '.join(WHEN)}")
        require(
            self.batch_size >= 1 and self.qa_batch_size >= 1 and self.hellaswag_batch_size >= 1,
            "batch sizes must be at least 1",
        )
        require(
            self.triviaqa_closed >= 0 and self.triviaqa_open >= 0 and self.hellaswag >= 0,
            "question and item counts cannot be negative",
        )
        require(self.open_book in OPEN_SOURCES, f"open_book must be one of {', '.join(OPEN_SOURCES)}")
        require(self.ppl_stride is None or self.ppl_stride >= 1, "ppl_stride must be at least 1")
        require(
            self.match in MATCH_PROTOCOLS, f"match must be one of {', '.join(MATCH_PROTOCOLS)} (got {self.match!r})"
        )
        require(
            not self.preset or self.preset in PRESETS,
            f"unknown evaluation preset {self.preset!r}; known: {', '.join(PRESETS)}",
        )

    @classmethod
    def expand(cls, data: dict) -> dict:
        """Called by `from_dict` before building: a preset's values under the keys given beside it."""
        name = data.get("preset")
        if name and name in PRESETS:
            return {**PRESETS[name], **data}
        return data

    def protocol(self, name: str) -> Protocol:
        """A protocol name with this config's limit and (for concat protocols) stride applied."""
        proto = Protocol.parse(name, limit=self.ppl_limit or None)
        if self.ppl_stride and proto.mode == "concat":
            proto = Protocol.parse(name, limit=self.ppl_limit or None, stride=self.ppl_stride)
        return proto


def data_needed(config: EvalConfig) -> set[tuple[str, str | None, str | None]]:
    """(dataset name, explicit file or None, row kind) of every data set `config` evaluates on."""
    needed: set[tuple[str, str | None, str | None]] = set()
    for p in config.perplexity:
        data = Protocol.parse(p).data
        needed.add(("file", data, "text") if is_file_protocol(data) else (data, None, "text"))
    if config.triviaqa_closed:
        needed.add(("triviaqa", config.triviaqa_file, "triviaqa"))
    if config.triviaqa_open:
        needed.add((config.open_book, None, None))  # the source's own row kind
    if config.hellaswag:
        needed.add(("hellaswag", None, "hellaswag"))
    return needed


def check_data(config: EvalConfig, data_dir=None) -> None:
    """Before any weights load: every data file `config` reads exists, every row of it is usable
    (`evals.data.check_dataset`; DataNotFound or DataError naming the file and line, or the path a
    user may not read), and the file holds as many questions or items as asked for (RecipeError)."""
    sizes = {}
    for name, path, rows in sorted(data_needed(config), key=str):
        sizes[name] = check_dataset(name, path=path, data_dir=data_dir, rows=rows), path
    asked = (
        ("triviaqa_closed", "--triviaqa-closed", config.triviaqa_closed, "triviaqa", "questions"),
        ("triviaqa_open", "--triviaqa-open", config.triviaqa_open, config.open_book, "questions"),
        ("hellaswag", "--hellaswag", config.hellaswag, "hellaswag", "items"),
    )
    for key, flag, n, name, what in asked:
        held, path = sizes.get(name, (None, None))
        if n and held is not None and n > held:  # a hub source is not counted: its size is checked later
            where = path or local_file(name, data_dir=data_dir) or name
            raise RecipeError(
                f"evaluation {key} ({flag}) = {n} asks for more {what} than {where} holds ({held}): "
                f"ask for at most {held}"
            )


def max_positions(model_config: dict | None) -> int | None:
    """The longest sequence the model takes (config.json's max_position_embeddings), if it says."""
    if not isinstance(model_config, dict):
        return None
    value = model_config.get("max_position_embeddings")
    if value is None and isinstance(model_config.get("text_config"), dict):
        value = model_config["text_config"].get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_lengths(config: EvalConfig, model_config: dict | None) -> None:
    """Before any weights load: no perplexity protocol reads sequences longer than the model takes
    (RecipeError naming the protocol and the limit)."""
    limit = max_positions(model_config)
    if limit is None:
        return
    for name in config.perplexity:
        length = Protocol.parse(name).seq_len
        if length > limit:
            raise RecipeError(
                f"perplexity protocol {name} reads {length}-token sequences but the model takes at most "
                f"{limit} (max_position_embeddings in its config.json): use a length up to {limit}"
            )


@dataclass
class EvalResult:
    metrics: list[dict] = field(default_factory=list)  # {"name", "value", "protocol", ...}
    details: dict = field(default_factory=dict)  # per-question records, generation samples

    def get(self, name: str) -> dict | None:
        return next((m for m in self.metrics if m["name"] == name), None)


def evaluate(
    model,
    tokenizer,
    config: EvalConfig,
    *,
    data_dir=None,
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_metric: Callable[[dict], None] | None = None,
) -> EvalResult:
    """Perplexity under each protocol, TriviaQA closed / open book, HellaSwag, generation samples.

    Metrics: {"name": "perplexity" | "triviaqa_closed" | "triviaqa_open" | "hellaswag_acc" |
    "hellaswag_acc_norm", "value", "protocol", ...}; accuracies carry `correct`, the count `n` and
    `ci95` (Wilson); QA metrics also the strict `exact_match`, the `match` protocol and how many
    questions each matching rule decided. Per-question records and samples go to `details`.
    """
    result = EvalResult()
    jobs: list[tuple[str, Callable]] = []
    for proto in config.perplexity:
        jobs.append(
            (
                f"perplexity {proto}",
                lambda prog, proto=proto: [_perplexity(model, tokenizer, config, proto, data_dir, prog, cancelled)],
            )
        )
    for task, n, name in (
        ("closed", config.triviaqa_closed, "triviaqa_closed"),
        ("open", config.triviaqa_open, "triviaqa_open"),
    ):
        if n:
            jobs.append(
                (
                    f"{name} ({n} questions)",
                    lambda prog, task=task, n=n, name=name: [
                        _qa(model, tokenizer, config, task, n, name, data_dir, prog, cancelled, result)
                    ],
                )
            )
    if config.hellaswag:
        jobs.append(
            (
                f"hellaswag ({config.hellaswag} items)",
                lambda prog: _hellaswag(model, tokenizer, config, data_dir, prog, cancelled, result),
            )
        )
    if config.samples:
        jobs.append(("generation samples", lambda prog: _samples(model, tokenizer, config, prog, cancelled, result)))
    for j, (label, job) in enumerate(jobs):

        def prog(f, j=j, label=label):
            if progress:
                progress((j + f) / len(jobs), label)

        if cancelled and cancelled():
            raise Cancelled("evaluation cancelled")
        prog(0.0)
        for metric in job(prog):
            result.metrics.append(metric)
            if on_metric:
                on_metric(metric)
    return result


def _perplexity(model, tokenizer, config, proto, data_dir, prog, cancelled) -> dict:
    r = perplexity(
        model,
        tokenizer,
        config.protocol(proto),
        data_dir=data_dir,
        batch_size=config.batch_size,
        progress=prog,
        cancelled=cancelled,
    )
    return {
        "name": "perplexity",
        "value": r.value,
        "protocol": r.protocol,
        "tokens": r.tokens,
        "sequences": r.sequences,
        "seconds": r.seconds,
        "source": r.source,
    }


def _qa(model, tokenizer, config, task, n, name, data_dir, prog, cancelled, result) -> dict:
    r = run_qa(
        model,
        tokenizer,
        task,
        n,
        seed=config.qa_seed,
        batch_size=config.qa_batch_size,
        chat=config.chat_template,
        data_dir=data_dir,
        open_source=config.open_book,
        match=config.match,
        path=config.triviaqa_file if task == "closed" else None,
        progress=prog,
        cancelled=cancelled,
    )
    metric = {**r.metric(name), "source": r.source}
    result.details[name] = {
        "protocol": r.protocol,
        "source": r.source,
        "match": r.match,
        "accuracy": r.accuracy,
        "exact_match": r.exact_match,
        "ci95": metric["ci95"],
        "records": r.records,
    }
    return metric


def _hellaswag(model, tokenizer, config, data_dir, prog, cancelled, result) -> list[dict]:
    r = hellaswag(
        model,
        tokenizer,
        config.hellaswag,
        seed=config.qa_seed,
        batch_size=config.hellaswag_batch_size,
        data_dir=data_dir,
        progress=prog,
        cancelled=cancelled,
    )
    result.details["hellaswag"] = {
        "protocol": r.protocol,
        "source": r.source,
        "acc": r.acc,
        "acc_norm": r.acc_norm,
        "records": r.records,
    }
    return r.metrics()


def _samples(model, tokenizer, config, prog, cancelled, result) -> list[dict]:
    result.details["samples"] = generation_samples(
        model, tokenizer, batch_size=config.qa_batch_size, progress=prog, cancelled=cancelled
    )
    return []
