"""When is a generated answer correct? The thesis rule, with strict exact match beside it.

Both sides are normalised the same way: Unicode NFKC, case-folded, dashes and slashes become
spaces (so "Jay-Z" and "Jay Z" agree), every other punctuation character is dropped (so "U.S.A."
is "usa"), whitespace collapses to single spaces. Accents are kept: "Röntgen" is not "Rontgen".

A prediction is correct if, over all aliases, in this order of preference:
1. `exact`: it equals an alias;
2. `substring`: an alias occurs in it as whole words ("paris" in "it is paris france", but "1"
   is not in "1990": a bare character substring would let short aliases match anything);
3. `words`: at least 80 % of an alias's words appear among its words.
Strict exact match (`exact_match`, as lm-evaluation-harness reports it) is rule 1 alone.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

WORDS_THRESHOLD = 0.8
RULES = ("exact", "substring", "words")
_SPACE = re.compile(r"\s+")
_SEPARATORS = {"/", "\\", "_"}


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").casefold()
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Pd" or ch in _SEPARATORS:
            out.append(" ")
        elif cat.startswith("P"):
            continue
        else:
            out.append(ch)
    return _SPACE.sub(" ", "".join(out)).strip()


@dataclass(frozen=True)
class Match:
    correct: bool
    rule: str | None = None  # "exact" | "substring" | "words" | None
    alias: str | None = None  # the alias that matched, as given in the data
    word_fraction: float = 0.0  # best fraction of an alias's words found (rule 3)

    @property
    def exact_match(self) -> bool:
        return self.rule == "exact"

    def to_dict(self) -> dict:
        return {"correct": self.correct, "exact_match": self.exact_match, "rule": self.rule,
                "matched_alias": self.alias, "word_fraction": round(self.word_fraction, 4)}


def match_answer(prediction: str, aliases: list[str] | tuple[str, ...]) -> Match:
    pred = normalize(prediction)
    normed = [(a, normalize(a)) for a in aliases]
    normed = [(a, n) for a, n in normed if n]
    if not pred or not normed:
        return Match(False)
    for a, n in normed:
        if pred == n:
            return Match(True, "exact", a, 1.0)
    padded = f" {pred} "
    for a, n in normed:
        if f" {n} " in padded:
            return Match(True, "substring", a, 1.0)
    pred_words = set(pred.split())
    best, best_alias = 0.0, None
    for a, n in normed:
        words = n.split()
        frac = sum(w in pred_words for w in words) / len(words)
        if frac > best:
            best, best_alias = frac, a
    if best >= WORDS_THRESHOLD:
        return Match(True, "words", best_alias, best)
    return Match(False, None, None, best)


def first_line(text: str) -> str:
    """The answer a model gave: the first line of its generated text that holds anything, stripped."""
    return text.strip().split("\n", 1)[0].strip()
