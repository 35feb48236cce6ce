"""Never train on what you evaluate: find evaluated questions and text inside training data.

A recipe's training stage (LoRA) calls `check_training_data` before any weights load; it
refuses the run (RecipeError) or returns warnings for the run's log. What the
recipe will evaluate is rebuilt from its `EvalConfig` exactly as the evaluation will pick it
(the same seeded question sample, the same first rows or windows of a perplexity split), and
compared with the whole training file:
- questions (TriviaQA, NQ-open) by their normalised text (`evals.matching.normalize`), against the
  training file's questions; and, for questions of five words or more, as a word sequence
  inside one of its texts (a plain-text file made from the questions is caught too);
- perplexity rows and HellaSwag contexts of twelve (contexts: eight) words or more, as word
  sequences: a row counts as contained when 90 % of its word 5-grams occur in one training text
  (short rows such as headings are common to many articles and prove nothing).
Training on the very file an evaluation reads is refused outright. The words of the shingle
comparison are case-folded `\\w+` runs with the articles dropped, on both sides.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from frankenlab.evals.data import load_texts
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.matching import ARTICLES, normalize
from frankenlab.evals.perplexity import Protocol, is_file_protocol

SHINGLE = 5
ROW_MIN_WORDS = 12
CONTEXT_MIN_WORDS = 8
ROW_CONTAINED = 0.9
CHARS_PER_TOKEN_BOUND = 8  # no English BPE tokenizer averages more: bounds the rows a window limit reaches
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()) if w not in ARTICLES]


def shingles(ws: list[str], k: int = SHINGLE) -> set[int]:
    return {hash(tuple(ws[i : i + k])) for i in range(len(ws) - k + 1)}


@dataclass
class EvaluatedSet:
    """What one evaluation will read: `kind` "questions" (exact and word-sequence match) or "rows"."""

    label: str  # "TriviaQA closed-book questions (triviaqa-closed-validation:200)"
    noun: str  # "questions", "rows", "contexts"
    source: str  # the file (or hub id) it comes from
    texts: list[str] = field(default_factory=list)
    kind: str = "rows"
    min_words: int = ROW_MIN_WORDS


@dataclass
class Overlap:
    evaluated: EvaluatedSet
    found: list[int]  # indices into evaluated.texts

    def message(self, who: str, train_source: str, advice: str) -> str:
        ev = self.evaluated
        n = len(ev.texts)
        example = ev.texts[self.found[0]].strip().replace("\n", " ")[:70]
        return (
            f"{len(self.found)} of the {n:,} evaluated {ev.label} are in the {who} training file "
            f"{train_source} (e.g. {example!r}): {advice}"
        )


def _evaluated_rows(proto: Protocol, data_dir) -> tuple[list[str], str]:
    if is_file_protocol(proto.data):
        texts, source = load_texts("file", path=Path(proto.data).expanduser())
    else:
        texts, source = load_texts(proto.data, data_dir=data_dir)
    if proto.limit:
        if proto.mode == "rows":
            rows = [t for t in texts if t.strip()][: proto.limit]
        else:  # the first windows cover at most this many characters of the joined text
            budget = ((proto.limit - 1) * (proto.stride or proto.seq_len) + proto.seq_len) * CHARS_PER_TOKEN_BOUND
            rows, used = [], 0
            for t in texts:
                if used > budget:
                    break
                rows.append(t)
                used += len(t) + 2
        texts = rows
    return texts, source


def evaluated_sets(config, data_dir=None) -> list[EvaluatedSet]:
    """Everything an `EvalConfig` will evaluate, as the evaluation itself will choose it."""
    from frankenlab.evals.hellaswag import load_items as hellaswag_items
    from frankenlab.evals.qa import load_items, protocol_name

    if config.after == "none":
        return []
    out = []
    for proto_name in config.perplexity:
        proto = config.protocol(proto_name)
        texts, source = _evaluated_rows(proto, data_dir)
        out.append(EvaluatedSet(f"rows of {proto.name}", "rows", source, texts))
    for task, n, what in (
        ("closed", config.triviaqa_closed, "closed-book"),
        ("open", config.triviaqa_open, "open-book"),
    ):
        if n:
            path = config.triviaqa_file if task == "closed" else None
            items, source, total = load_items(
                task, n, seed=config.qa_seed, data_dir=data_dir, path=path, open_source=config.open_book
            )
            label = protocol_name(task, n, config.qa_seed, False, total, config.open_book, config.match, path)
            out.append(
                EvaluatedSet(
                    f"{what} questions ({label})",
                    "questions",
                    source,
                    [it.question for it in items],
                    "questions",
                    SHINGLE,
                )
            )
    if config.hellaswag:
        items, source, _ = hellaswag_items(config.hellaswag, seed=config.qa_seed, data_dir=data_dir)
        out.append(
            EvaluatedSet(
                f"HellaSwag contexts ({config.hellaswag} items)",
                "contexts",
                source,
                [it.query for it in items],
                "rows",
                CONTEXT_MIN_WORDS,
            )
        )
    return out


def find_overlaps(train_texts: list[str], train_questions: list[str], evaluated: list[EvaluatedSet]) -> list[Overlap]:
    """Evaluated questions or rows found in the training data; one Overlap per set that has any."""
    asked = {normalize(q) for q in train_questions if q}
    # the evaluated side is small: map each of its shingles to the items holding it, then scan the training text
    wanted: dict[int, list[tuple[int, int]]] = {}
    item_shingles: dict[tuple[int, int], int] = {}
    for s, ev in enumerate(evaluated):
        for i, text in enumerate(ev.texts):
            ws = words(text)
            if len(ws) < ev.min_words:
                continue
            sh = shingles(ws)
            item_shingles[(s, i)] = len(sh)
            for h in sh:
                wanted.setdefault(h, []).append((s, i))
    contained: set[tuple[int, int]] = set()
    if wanted:
        for text in train_texts:  # an item counts only when one training text holds it
            ws = words(text)
            hits: dict[tuple[int, int], set[int]] = {}
            for j in range(len(ws) - SHINGLE + 1):
                h = hash(tuple(ws[j : j + SHINGLE]))
                for key in wanted.get(h, ()):
                    hits.setdefault(key, set()).add(h)
            for key, got in hits.items():
                need = (
                    item_shingles[key] if evaluated[key[0]].kind == "questions" else ROW_CONTAINED * item_shingles[key]
                )
                if len(got) >= need:
                    contained.add(key)
    out = []
    for s, ev in enumerate(evaluated):
        found = [
            i
            for i, text in enumerate(ev.texts)
            if (s, i) in contained or (ev.kind == "questions" and normalize(text) in asked)
        ]
        if found:
            out.append(Overlap(ev, found))
    return out


def same_file(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, ValueError):
        return False


def check_training_data(
    train_texts: list[str],
    train_questions: list[str],
    train_source: str,
    config,
    data_dir=None,
    *,
    who: str = "LoRA",
    advice: str = "train on a train split, or remove them from the training file",
) -> list[str]:
    """Refuse (RecipeError) training data that holds what `config` will evaluate; return warnings.

    `train_questions[i]` is record i's question ("" for plain text). Refused: an evaluated
    question asked again (same normalised text), an evaluated question or row inside a plain-text
    record. Only warned about: an evaluated question inside a longer training question (a near
    duplicate, e.g. "Born in Denby in 1646, who was the first Astronomer Royal?"), whose answer
    the adapter may learn."""
    evaluated = evaluated_sets(config, data_dir)
    for ev in evaluated:
        if same_file(train_source, ev.source):
            raise RecipeError(
                f"the {who} training file {train_source} is the file the evaluation reads for its {ev.label}: {advice}"
            )
    plain = [t for t, q in zip(train_texts, train_questions, strict=False) if not q]
    asked = [q for q in train_questions if q]
    refused = find_overlaps(plain, asked, evaluated)
    rows = [ev for ev in evaluated if ev.kind == "rows"]
    refused += find_overlaps([t for t, q in zip(train_texts, train_questions, strict=False) if q], [], rows)
    if refused:
        raise RecipeError("; ".join(o.message(who, train_source, advice) for o in refused))
    questions = [ev for ev in evaluated if ev.kind == "questions"]
    near = find_overlaps([t for t, q in zip(train_texts, train_questions, strict=False) if q], [], questions)
    return [
        f"{who}: {len(o.found)} of the {len(o.evaluated.texts):,} evaluated {o.evaluated.label} appear inside "
        f"longer questions of the training file {train_source} (e.g. "
        f"{o.evaluated.texts[o.found[0]][:70]!r}): their answers may be learnt; evaluate other questions "
        "(qa_seed) to rule it out"
        for o in near
    ]
