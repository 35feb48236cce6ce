"""Question answering by greedy generation: TriviaQA closed book, and an open-book task.

Closed book (thesis): "Question: {q}\\nAnswer:" on TriviaQA validation questions (or any question
file in the same format, `path=`), greedy, 1 to 50 new tokens. What is scored is a named match
protocol (`evals.matching`): `first-line` (generation stops at the end of the first line),
`thesis` (the whole answer, up to 50 new tokens) or `first-line-noecho` (the first line, not
counting a hit that only repeats an alias the question contains). Open book: "Context: {c}\\nQuestion: {q}\\nAnswer:"
with the shortest context passage. TriviaQA's evidence documents need the hub; offline the open-book
task uses the NQ-open questions with their gold Wikipedia passage (`ctxs[0]`, ~100 words) and is
labelled `nq-open-oracle-openbook`, never as TriviaQA. `open_source="triviaqa-rc"` asks for TriviaQA
rc (hub, or a local JSONL of hub rows) with its shortest evidence text, labelled
`triviaqa-rc-openbook-validation`. Correctness: `evals.matching`.

Questions are a seeded random sample of the file (seed 0 by default), so a given (n, seed) is the
same set everywhere; the protocol string names it, the question file and the match protocol, e.g.
`triviaqa-closed-validation:200:first-line`. Every question keeps a record (prediction, aliases,
matched alias, rule) so failures, and lenient matches, can be inspected; under `thesis` each
record also says whether the first line alone would have been correct. Accuracies carry their
question count and 95 % Wilson interval (`evals.stats`), and every result counts its echo hits
(`echo_hits`: answers that only repeat an alias the question contains, `evals.matching`). A label
that names the standard question set carries `@sha256:<8 hex digits>` when the file read is not
the standard one (`evals.data.data_label`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from frankenlab.evals.data import DATASETS, data_label, load_dataset_records
from frankenlab.evals.generate import apply_chat, generate_greedy
from frankenlab.evals.matching import MATCH_PROTOCOLS, NOECHO, answer_text, first_line, match_answer, split_echo
from frankenlab.evals.stats import accuracy_fields

TASKS = ("closed", "open")
CLOSED_PROMPT = "Question: {question}\nAnswer:"
OPEN_PROMPT = "Context: {context}\nQuestion: {question}\nAnswer:"
MAX_NEW_TOKENS = 50


@dataclass(frozen=True)
class QAItem:
    index: int  # row in the source file
    question: str
    aliases: tuple[str, ...]
    context: str | None = None


@dataclass
class QAResult:
    task: str  # "closed" | "open"
    protocol: str
    accuracy: float  # thesis rule
    exact_match: float  # strict
    n: int
    seconds: float
    source: str
    rules: dict = field(default_factory=dict)  # how many questions each rule decided
    records: list[dict] = field(default_factory=list)
    match: str = "first-line"  # the match protocol (evals.matching.MATCH_PROTOCOLS)

    @property
    def questions_per_second(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    def metric(self, name: str) -> dict:
        out = {
            "name": name,
            "value": self.accuracy,
            "protocol": self.protocol,
            "match": self.match,
            "exact_match": self.exact_match,
            **accuracy_fields(sum(r["correct"] for r in self.records), self.n),
            "seconds": self.seconds,
            "rules": self.rules,
            # hits that only repeat an alias the question contains (not counted correct under first-line-noecho)
            "echo_hits": sum(bool(r.get("echo")) for r in self.records),
        }
        if self.match == "thesis" and self.records:
            out["first_line_accuracy"] = sum(r["first_line_correct"] for r in self.records) / len(self.records)
        return out


def parse_triviaqa(rec: dict, index: int) -> QAItem:
    """A TriviaQA row: local files hold `context` ("Question: ...\\nAnswer:"), hub rows `question`."""
    q = rec.get("question")
    if not q:
        ctx = rec.get("context", "")
        q = ctx.split("Question:", 1)[-1].rsplit("Answer:", 1)[0].strip()
    aliases = rec.get("aliases")
    ans = rec.get("answer")
    if isinstance(ans, dict):  # hub format: answer = {"value", "aliases", "normalized_aliases", ...}
        aliases = aliases or ans.get("aliases")
        ans = ans.get("value")
    aliases = list(aliases or [])
    if ans and ans not in aliases:
        aliases.insert(0, ans)
    if not q or not aliases:
        raise ValueError(f"TriviaQA row {index} has no question or no answer")
    return QAItem(index, q, tuple(aliases))


def parse_triviaqa_rc(rec: dict, index: int) -> QAItem:
    """A TriviaQA rc row (hub format) with its shortest evidence text (Wikipedia page or web result)."""
    item = parse_triviaqa(rec, index)
    pages = (rec.get("entity_pages") or {}).get("wiki_context") or []
    results = (rec.get("search_results") or {}).get("search_context") or []
    contexts = [c.strip() for c in list(pages) + list(results) if c and c.strip()]
    if not contexts:
        raise ValueError(f"TriviaQA rc row {index} has no evidence text")
    return QAItem(index, item.question, item.aliases, min(contexts, key=len))


def parse_nq_open(rec: dict, index: int) -> QAItem:
    ctxs = rec.get("ctxs") or []
    if not ctxs:
        raise ValueError(f"NQ-open row {index} has no context passage (ctxs)")
    passage = ctxs[0]  # the gold passage: the shortest context that holds the answer
    return QAItem(index, rec["question"], tuple(rec["answers"]), passage["text"].strip())


OPEN_SOURCES = {
    "nq-open": ("nq-open-oracle-openbook", parse_nq_open),
    "triviaqa-rc": ("triviaqa-rc-openbook-validation", parse_triviaqa_rc),
}


def question_set(task: str, path=None, open_source: str = "nq-open") -> str:
    """The question set's name in a protocol: `triviaqa-closed-validation`, or the file's stem for
    any other question file (`triviaqa-closed-my_questions`)."""
    if path is None:
        return "triviaqa-closed-validation" if task == "closed" else OPEN_SOURCES[open_source][0]
    name = Path(path).name
    if task == "closed" and name == Path(DATASETS["triviaqa"].relpath).name:
        return "triviaqa-closed-validation"
    stem = name.split(".")[0] or name
    return f"triviaqa-closed-{stem}" if task == "closed" else f"{stem}-openbook"


def protocol_name(
    task: str,
    n: int,
    seed: int,
    chat: bool,
    total: int,
    open_source: str = "nq-open",
    match: str = "first-line",
    path=None,
) -> str:
    s = f"{question_set(task, path, open_source)}:{n}"
    if seed and n < total:
        s += f":seed{seed}"
    if chat:
        s += "+chat"
    return f"{s}:{match}"


def load_items(
    task: str, n: int, *, seed: int = 0, data_dir=None, path=None, open_source: str = "nq-open"
) -> tuple[list[QAItem], str, int]:
    """A seeded sample of n questions, in file order; the source label and the file's size.

    The open-book source is NQ-open with gold passages (local) or TriviaQA rc (hub, large download).
    """
    if task not in TASKS:
        raise ValueError(f"unknown QA task {task!r}; use one of {', '.join(TASKS)}")
    if open_source not in OPEN_SOURCES:
        raise ValueError(f"unknown open-book source {open_source!r}; use one of {', '.join(OPEN_SOURCES)}")
    name, parse = ("triviaqa", parse_triviaqa) if task == "closed" else (open_source, OPEN_SOURCES[open_source][1])
    records, source = load_dataset_records(name, path=path, data_dir=data_dir)
    if n > len(records):
        raise ValueError(f"{n} questions asked for but {source} holds only {len(records)}")
    picked = sorted(random.Random(seed).sample(range(len(records)), n)) if n < len(records) else range(n)
    try:
        return [parse(records[i], i) for i in picked], source, len(records)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{source}: {exc}. Each row needs a question (`question`, or `context` as "
            '"Question: ...\\nAnswer:") and an `answer` or `aliases`'
        ) from None


def build_prompt(item: QAItem, *, chat: bool = False, tokenizer=None) -> str:
    if item.context is None:
        prompt = CLOSED_PROMPT.format(question=item.question)
    else:
        prompt = OPEN_PROMPT.format(context=item.context, question=item.question)
    return apply_chat(tokenizer, prompt) if chat else prompt


def score(items: list[QAItem], generations, match: str = "first-line") -> tuple[list[dict], float, float, dict]:
    """Per-question records, accuracy, strict exact match and how many questions each rule decided."""
    records, correct, exact = [], 0, 0
    rules = {"exact": 0, "substring": 0, "words": 0, "none": 0}
    for item, g in zip(items, generations, strict=False):
        pred = answer_text(g.text, match)
        full, own, echo = split_echo(pred, item.question, item.aliases)
        m = own if match == NOECHO else full  # no-echo: aliases the question holds are no evidence
        correct += m.correct
        exact += m.exact_match
        rules[m.rule or "none"] += 1
        rec = {
            "index": item.index,
            "question": item.question,
            "prediction": pred,
            "generated": g.text,
            "new_tokens": g.new_tokens,
            **m.to_dict(),
            "echo": echo,  # matched only aliases the question itself contains (counted under every protocol)
            "aliases": list(item.aliases),
        }
        if match == "thesis":
            rec["first_line_correct"] = match_answer(first_line(g.text), item.aliases).correct
        records.append(rec)
    n = max(len(items), 1)
    return records, correct / n, exact / n, rules


def run_qa(
    model,
    tokenizer,
    task: str,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool = False,
    data_dir=None,
    path=None,
    open_source: str = "nq-open",
    max_new_tokens: int = MAX_NEW_TOKENS,
    match: str = "first-line",
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> QAResult:
    """`path`: a question file in TriviaQA's format (closed book) instead of the validation split."""
    if match not in MATCH_PROTOCOLS:
        raise ValueError(f"unknown match protocol {match!r}; use one of {', '.join(MATCH_PROTOCOLS)}")
    t0 = time.perf_counter()
    items, source, total = load_items(task, n, seed=seed, data_dir=data_dir, path=path, open_source=open_source)
    prompts = [build_prompt(it, chat=chat, tokenizer=tokenizer) for it in items]
    # A prompt longer than the model's context keeps its end (the question and "Answer:").
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = max_pos - max_new_tokens if isinstance(max_pos, int) and max_pos > max_new_tokens else None
    gens = generate_greedy(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_at_newline=match != "thesis",
        batch_size=batch_size,
        max_prompt_tokens=room,
        progress=progress,
        cancelled=cancelled,
    )
    records, acc, em, rules = score(items, gens, match)
    label = protocol_name(task, n, seed, chat, total, open_source, match, path)
    if question_set(task, path, open_source) == question_set(task, None, open_source):  # claims the standard set
        label += data_label("triviaqa" if task == "closed" else open_source, source)
    return QAResult(
        task,
        label,
        acc,
        em,
        len(items),
        time.perf_counter() - t0,
        source,
        rules,
        records,
        match,
    )
