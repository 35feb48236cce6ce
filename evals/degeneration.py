"""Has a generation degenerated? Three numbers per text, stored with every generation sample.

Pruned models fail in recognisable ways (the thesis saw non-ASCII garbage and "(disambiguation)"
loops); perplexity alone does not show it. On the generated text only (not the prompt):
- `non_ascii`: share of characters outside ASCII (0.0 for plain English; garbage pushes it up);
- `distinct_2`: unique word bigrams / word bigrams (Li et al. 2016); 1.0 = no bigram repeats,
  low = the text goes round in circles (None when the text has fewer than two words);
- `repeat_run`: the longest stretch of words made of one n-gram (1 to 16 words) said back to back
  at least twice: `words` covered, the `ngram`, how many `times` (0 words when nothing repeats).
Words are whitespace-separated, so "(disambiguation)" is one word.
"""

from __future__ import annotations

MAX_NGRAM = 16


def non_ascii_share(text: str) -> float:
    return sum(ord(c) > 127 for c in text) / len(text) if text else 0.0


def distinct_n(words: list[str], n: int = 2) -> float | None:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def longest_repeat(words: list[str], max_n: int = MAX_NGRAM) -> dict:
    """The longest back-to-back repetition of one n-gram: {"words", "ngram", "times"}.

    For each n and each start, count how often the n-gram at that start repeats immediately;
    ties go to the shorter n-gram (the loop's unit), then to the earlier start."""
    best = {"words": 0, "ngram": "", "times": 0}
    for n in range(1, max_n + 1):
        i = 0
        while i + 2 * n <= len(words):
            times = 1
            while words[i + times * n : i + (times + 1) * n] == words[i : i + n]:
                times += 1
            if times >= 2 and times * n > best["words"]:
                best = {"words": times * n, "ngram": " ".join(words[i : i + n]), "times": times}
            i += (times - 1) * n + 1 if times >= 2 else 1
    return best


def degeneration(text: str) -> dict:
    words = text.split()
    d2 = distinct_n(words, 2)
    return {
        "non_ascii": round(non_ascii_share(text), 4),
        "distinct_2": None if d2 is None else round(d2, 4),
        "repeat_run": longest_repeat(words),
    }


def summary(texts: list[str]) -> dict:
    """Means over texts (distinct-2 over those with two words or more), the worst repeat run."""
    rows = [degeneration(t) for t in texts]
    d2 = [r["distinct_2"] for r in rows if r["distinct_2"] is not None]
    return {
        "non_ascii": round(sum(r["non_ascii"] for r in rows) / len(rows), 4) if rows else 0.0,
        "distinct_2": round(sum(d2) / len(d2), 4) if d2 else None,
        "longest_repeat_words": max((r["repeat_run"]["words"] for r in rows), default=0),
    }


def describe(d: dict) -> str:
    """One line for a terminal: 'non-ASCII 0 %, distinct-2 0.97, repeat: none'."""
    run = d["repeat_run"]
    rep = f"'{run['ngram'][:30]}' x{run['times']}" if run["words"] else "none"
    d2 = "-" if d["distinct_2"] is None else f"{d['distinct_2']:.2f}"
    return f"non-ASCII {100 * d['non_ascii']:.0f} %, distinct-2 {d2}, repeat: {rep}"
