"""Question answering by greedy generation: TriviaQA closed book, and an open-book task.

Closed book (thesis): "Question: {q}\\nAnswer:" on TriviaQA validation questions, greedy, 1 to 50
new tokens, the answer is the first generated line. Open book: "Context: {c}\\nQuestion: {q}\\nAnswer:"
with the shortest context passage. TriviaQA's evidence documents need the hub; offline the open-book
task uses the NQ-open questions with their gold Wikipedia passage (`ctxs[0]`, ~100 words) and is
labelled `nq-open-oracle-openbook`, never as TriviaQA. `open_source="triviaqa-rc"` asks for TriviaQA
rc (hub, or a local JSONL of hub rows) with its shortest evidence text, labelled
`triviaqa-rc-openbook-validation`. Correctness: `evals.matching`.

Questions are a seeded random sample of the file (seed 0 by default), so a given (n, seed) is the
same set everywhere; the protocol string names it. Every question keeps a record (prediction,
aliases, matched alias, rule) so failures can be inspected.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .data import load_dataset_records
from .generate import apply_chat, generate_greedy
from .matching import first_line, match_answer

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

    @property
    def questions_per_second(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    def metric(self, name: str) -> dict:
        return {"name": name, "value": self.accuracy, "protocol": self.protocol, "exact_match": self.exact_match,
                "n": self.n, "seconds": self.seconds, "rules": self.rules}


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


OPEN_SOURCES = {"nq-open": ("nq-open-oracle-openbook", parse_nq_open),
                "triviaqa-rc": ("triviaqa-rc-openbook-validation", parse_triviaqa_rc)}


def protocol_name(task: str, n: int, seed: int, chat: bool, total: int, open_source: str = "nq-open") -> str:
    base = "triviaqa-closed-validation" if task == "closed" else OPEN_SOURCES[open_source][0]
    s = f"{base}:{n}"
    if seed and n < total:
        s += f":seed{seed}"
    if chat:
        s += "+chat"
    return s


def load_items(task: str, n: int, *, seed: int = 0, data_dir=None, path=None,
               open_source: str = "nq-open") -> tuple[list[QAItem], str, int]:
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
    return [parse(records[i], i) for i in picked], source, len(records)


def build_prompt(item: QAItem, *, chat: bool = False, tokenizer=None) -> str:
    if item.context is None:
        prompt = CLOSED_PROMPT.format(question=item.question)
    else:
        prompt = OPEN_PROMPT.format(context=item.context, question=item.question)
    return apply_chat(tokenizer, prompt) if chat else prompt


def score(items: list[QAItem], generations) -> tuple[list[dict], float, float, dict]:
    records, correct, exact = [], 0, 0
    rules = {"exact": 0, "substring": 0, "words": 0, "none": 0}
    for item, g in zip(items, generations):
        pred = first_line(g.text)
        m = match_answer(pred, item.aliases)
        correct += m.correct
        exact += m.exact_match
        rules[m.rule or "none"] += 1
        records.append({"index": item.index, "question": item.question, "prediction": pred,
                        "generated": g.text, "new_tokens": g.new_tokens, **m.to_dict(),
                        "aliases": list(item.aliases)})
    n = max(len(items), 1)
    return records, correct / n, exact / n, rules


def run_qa(model, tokenizer, task: str, n: int, *, seed: int = 0, batch_size: int = 8, chat: bool = False,
           data_dir=None, path=None, open_source: str = "nq-open", max_new_tokens: int = MAX_NEW_TOKENS,
           progress: Callable[[float], None] | None = None,
           cancelled: Callable[[], bool] | None = None) -> QAResult:
    t0 = time.perf_counter()
    items, source, total = load_items(task, n, seed=seed, data_dir=data_dir, path=path, open_source=open_source)
    prompts = [build_prompt(it, chat=chat, tokenizer=tokenizer) for it in items]
    # A prompt longer than the model's context keeps its end (the question and "Answer:").
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = max_pos - max_new_tokens if isinstance(max_pos, int) and max_pos > max_new_tokens else None
    gens = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_at_newline=True,
                           batch_size=batch_size, max_prompt_tokens=room, progress=progress, cancelled=cancelled)
    records, acc, em, rules = score(items, gens)
    return QAResult(task, protocol_name(task, n, seed, chat, total, open_source), acc, em, len(items),
                    time.perf_counter() - t0, source, rules, records)

