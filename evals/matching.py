"""When is a generated answer correct? Two named match protocols, strict exact match beside both.

Normalisation (both sides, every rule) is SQuAD's and lm-evaluation-harness' answer normalisation
with Unicode care: NFKC, case-folded, punctuation dropped, the articles a/an/the dropped,
whitespace collapsed; dashes and slashes become spaces ("Jay-Z" = "Jay Z"; SQuAD would make it
"jayz"). So "Beatles" against the alias "The Beatles" is an exact match. Accents are kept.

Rules, over all aliases, in this order of preference:
1. `exact`: the prediction equals an alias;
2. `substring`: an alias occurs in it as whole words ("paris" in "it is paris france", but "1"
   is not in "1990");
3. `words`: at least 80 % of an alias's words appear among its words.
Strict exact match (`exact_match`) is rule 1 alone. Rules 2 and 3 are lenient, so aliases that
normalise to a stopword or a single character ("of", "one", ".a") are ignored by them: otherwise
almost any answer would contain one. Such aliases still count for rule 1.

Match protocols say what text the rules see:
- `first-line`: the first line of the answer that holds anything (generation stops there);
- `thesis`: the whole generated answer, up to 50 new tokens (the thesis' protocol; more lenient,
  since a rambling answer gets many chances to contain an alias);
- `first-line-noecho`: `first-line`, scored only against the aliases the question does not itself
  contain (as whole words, normalised), so that repeating the question is not an answer.

Echo hits: a hit is an echo when the prediction matches only aliases that occur in the question
("Which island group became known as The Friendly Islands?" -> "The Friendly Islands is ...",
alias "The Friendly Islands"). Every protocol counts them (`is_echo`); `first-line` and `thesis`
still score them correct, `first-line-noecho` does not.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

WORDS_THRESHOLD = 0.8
RULES = ("exact", "substring", "words")
MATCH_PROTOCOLS = ("first-line", "thesis", "first-line-noecho")
NOECHO = "first-line-noecho"
_SPACE = re.compile(r"\s+")
_SEPARATORS = {"/", "\\", "_"}
ARTICLES = frozenset({"a", "an", "the"})
# English function words (NLTK's list without contractions) and "one": an alias that is only one
# of these says nothing when found inside a longer answer.
STOPWORDS = frozenset(
    """
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves what which who whom this that these
those am is are was were be been being have has had having do does did doing a an the and but if or
because as until while of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where
why how all any both each few more most other some such no nor not only own same so than too very
s t can will just don should now d ll m o re ve y ain one
""".split()
)


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
    return " ".join(w for w in _SPACE.split("".join(out)) if w and w not in ARTICLES)


def is_degenerate(normalized_alias: str) -> bool:
    """An alias too weak for the substring and word rules: one character or one stopword."""
    return len(normalized_alias) <= 1 or normalized_alias in STOPWORDS


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
        return {
            "correct": self.correct,
            "exact_match": self.exact_match,
            "rule": self.rule,
            "matched_alias": self.alias,
            "word_fraction": round(self.word_fraction, 4),
        }


def match_answer(prediction: str, aliases: list[str] | tuple[str, ...]) -> Match:
    pred = normalize(prediction)
    normed = [(a, normalize(a)) for a in aliases]
    normed = [(a, n) for a, n in normed if n]
    if not pred or not normed:
        return Match(False)
    for a, n in normed:
        if pred == n:
            return Match(True, "exact", a, 1.0)
    lenient = [(a, n) for a, n in normed if not is_degenerate(n)]
    padded = f" {pred} "
    for a, n in lenient:
        if f" {n} " in padded:
            return Match(True, "substring", a, 1.0)
    pred_words = set(pred.split())
    best, best_alias = 0.0, None
    for a, n in lenient:
        words = n.split()
        frac = sum(w in pred_words for w in words) / len(words)
        if frac > best:
            best, best_alias = frac, a
    if best >= WORDS_THRESHOLD:
        return Match(True, "words", best_alias, best)
    return Match(False, None, None, best)


def echoed_aliases(question: str, aliases: list[str] | tuple[str, ...]) -> set[str]:
    """The aliases whose normalised words occur, as whole words, in the normalised question."""
    q = f" {normalize(question)} "
    return {a for a in aliases if (n := normalize(a)) and f" {n} " in q}


def split_echo(prediction: str, question: str, aliases) -> tuple[Match, Match, bool]:
    """(match against every alias, match against the aliases the question does not contain, is_echo):
    an echo is a prediction that matches only aliases the question itself holds."""
    full = match_answer(prediction, aliases)
    echoed = echoed_aliases(question, aliases) if full.correct else set()
    if not echoed:
        return full, full, False
    own = match_answer(prediction, [a for a in aliases if a not in echoed])
    return full, own, not own.correct


def first_line(text: str) -> str:
    """The answer a model gave: the first line of its generated text that holds anything, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def answer_text(generated: str, protocol: str) -> str:
    """The text a match protocol scores: the first line, or the whole answer (thesis)."""
    if protocol not in MATCH_PROTOCOLS:
        raise ValueError(f"unknown match protocol {protocol!r}; use one of {', '.join(MATCH_PROTOCOLS)}")
    return generated.strip() if protocol == "thesis" else first_line(generated)
