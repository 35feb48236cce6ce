"""Degeneration metrics on hand-written strings, and the samples that carry them."""

import pytest

from frankenlab.evals.degeneration import degeneration, describe, distinct_n, longest_repeat, non_ascii_share, summary


def test_non_ascii_share():
    assert non_ascii_share("Paris is the capital.") == 0.0
    assert non_ascii_share("ab\u00e9\u4e2d") == 0.5  # 2 of 4 characters
    assert non_ascii_share("") == 0.0


def test_distinct_2():
    assert distinct_n("the cat sat on the mat".split()) == 1.0  # 5 bigrams, all different
    assert distinct_n("a b a b a b".split()) == pytest.approx(2 / 5)  # (a b), (b a) over 5 bigrams
    assert distinct_n(["alone"]) is None


def test_longest_repeat_finds_the_loop_unit():
    loop = "Paris (disambiguation) (disambiguation) (disambiguation) (disambiguation) is"
    assert longest_repeat(loop.split()) == {"words": 4, "ngram": "(disambiguation)", "times": 4}
    assert longest_repeat("x a b c a b c a b c y".split()) == {"words": 9, "ngram": "a b c", "times": 3}
    assert longest_repeat("one two three four".split()) == {"words": 0, "ngram": "", "times": 0}
    # a longer run of a 2-gram beats a shorter run of a 1-gram
    assert longest_repeat("z z a b a b a b".split())["ngram"] == "a b"


def test_degeneration_record_and_summary():
    d = degeneration(" The The The end")
    assert d == {
        "non_ascii": 0.0,
        "distinct_2": pytest.approx(2 / 3, abs=1e-4),
        "repeat_run": {"words": 3, "ngram": "The", "times": 3},
    }
    assert describe(d) == "non-ASCII 0 %, distinct-2 0.67, repeat: 'The' x3"
    s = summary(["clean text here", "\u00e9\u00e9 ab", "x"])
    assert s["non_ascii"] == pytest.approx((0 + 0.4 + 0) / 3, abs=1e-4)  # 2 of 5 characters in the second
    assert s["distinct_2"] == pytest.approx(1.0) and s["longest_repeat_words"] == 0


def test_samples_carry_degeneration_metrics(tiny):
    from frankenlab.evals.samples import generation_samples

    out = generation_samples(tiny.model, tiny.tokenizer, ["The river", "Paris is"], max_new_tokens=6)
    for item in out["items"]:
        assert item["degeneration"] == degeneration(item["output"])
    assert set(out["degeneration"]) == {"non_ascii", "distinct_2", "longest_repeat_words"}
