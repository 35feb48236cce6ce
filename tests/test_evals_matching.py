"""The answer matcher: normalisation and each of the thesis' three rules, with strict EM beside it;
the two match protocols; degenerate aliases; Wilson intervals."""

import pytest

from frankenlab.evals.generate import Generation
from frankenlab.evals.matching import answer_text, first_line, is_degenerate, match_answer, normalize
from frankenlab.evals.qa import QAItem, score
from frankenlab.evals.stats import format_accuracy, wilson


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  The  Mikado! ", "mikado"),  # articles go, as in SQuAD / lm-evaluation-harness
        ("A Tale of Two Cities", "tale of two cities"),
        ("an apple, the end", "apple end"),
        ("Theatre Anthem", "theatre anthem"),  # only whole words are articles
        ("U.S.A.", "usa"),
        ("Jay-Z", "jay z"),
        ("AC/DC", "ac dc"),
        ("Rock\u2013and\u2014roll", "rock and roll"),  # en and em dashes
        ("\u201cSmart quotes\u201d", "smart quotes"),
        ("Senj\u014d no Valkyria", "senj\u014d no valkyria"),  # accents are kept
        ("\uff21\uff22\uff23", "abc"),  # full-width letters fold under NFKC
        ("STRASSE", "strasse"),
        ("Stra\u00dfe", "strasse"),  # casefold, not lower
        ("\tline\nbreak ", "line break"),
        ("?!.", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_rule_wins_over_substring():
    m = match_answer("The Mikado.", ["The Mikado", "Mikado"])
    assert (m.correct, m.rule, m.alias, m.exact_match) == (True, "exact", "The Mikado", True)


def test_strict_exact_match_drops_articles():
    # "Beatles" against the only alias "The Beatles" is an exact match (it was wrong under every rule)
    m = match_answer("Beatles", ["The Beatles"])
    assert (m.correct, m.rule, m.exact_match) == (True, "exact", True)
    assert match_answer("the Beatles!", ["Beatles"]).exact_match


def test_exact_after_normalisation_with_unicode():
    m = match_answer("  wilhelm conrad r\u00f6ntgen ", ["Wilhelm Conrad R\u00f6ntgen"])
    assert m.rule == "exact" and m.exact_match


def test_substring_rule_is_word_aligned():
    m = match_answer("I think it is Paris, France", ["Paris"])
    assert (m.correct, m.rule, m.alias, m.exact_match) == (True, "substring", "Paris", False)
    # a bare character substring would accept these; whole words do not
    assert not match_answer("1990", ["1"]).correct
    assert not match_answer("Parisian", ["Paris"]).correct


def test_words_rule_at_eighty_percent():
    # 4 of 5 alias words = 80 %: correct by the third rule only
    m = match_answer("Bagdasarian Ross senior, the man David", ["Ross Bagdasarian Senior Creator David"])
    assert (m.correct, m.rule) == (True, "words")
    assert m.word_fraction == pytest.approx(0.8)
    # 3 of 4 = 75 %: not enough
    m = match_answer("Ross Bagdasarian wrote it", ["Ross Bagdasarian Sr songwriter"])
    assert not m.correct and m.rule is None and m.word_fraction == pytest.approx(0.5)
    m = match_answer("Ross Bagdasarian Sr", ["Ross Bagdasarian Sr songwriter"])
    assert not m.correct and m.word_fraction == pytest.approx(0.75)


def test_words_rule_ignores_order_and_punctuation():
    m = match_answer("Bagdasarian, Ross (Sr.)", ["Ross Bagdasarian Sr."])
    assert m.correct and m.rule == "words" and m.alias == "Ross Bagdasarian Sr."


def test_wrong_and_empty():
    assert match_answer("London", ["Paris", "Paname"]).correct is False
    assert match_answer("", ["Paris"]).correct is False
    assert match_answer("...", ["Paris"]).correct is False  # nothing left after normalisation
    assert match_answer("Paris", ["", "!!"]).correct is False  # aliases empty after normalisation


def test_record_dict():
    d = match_answer("Onions", ["Onion", "Onions"]).to_dict()
    assert d == {"correct": True, "exact_match": True, "rule": "exact", "matched_alias": "Onions", "word_fraction": 1.0}


def test_degenerate_aliases_do_not_match_by_substring_or_words():
    aliases = ["Helicopter", "of", "one", ".a", "B"]
    assert [is_degenerate(normalize(a)) for a in aliases] == [False, True, True, True, True]
    # any answer holds "of" or "one": those aliases must not make it correct
    assert not match_answer("The Battle of Hastings was one of many", aliases).correct
    assert not match_answer("plan b", ["B"]).correct
    # ...but they still count for exact match
    m = match_answer("One", ["1", "one"])
    assert (m.correct, m.rule, m.alias) == (True, "exact", "one")
    assert match_answer("a helicopter of sorts", aliases).rule == "substring"


def test_protocols_score_different_text():
    gen = " I am not sure.\nQuestion: And the capital of France?\nAnswer: Paris"
    assert answer_text(gen, "first-line") == "I am not sure."
    assert answer_text(gen, "thesis") == gen.strip()
    with pytest.raises(ValueError, match="unknown match protocol"):
        answer_text(gen, "loose")


def test_score_under_both_protocols_answer_after_the_first_line():
    items = [
        QAItem(0, "Capital of France?", ("Paris",)),
        QAItem(1, "Who wrote Hamlet?", ("William Shakespeare",)),
        QAItem(2, "Band?", ("The Beatles",)),
        QAItem(3, "Largest planet?", ("Jupiter",)),
    ]
    gens = [
        Generation("", " Paris\nQuestion: x", 3),  # right on the first line
        Generation("", " I think\nit was William Shakespeare.", 9),  # right only after the first line
        Generation("", " Beatles", 2),  # exact once the article is dropped
        Generation("", " Saturn\nQuestion: Largest moon?\nAnswer: Ganymede", 12),
    ]  # wrong either way
    rec_first, acc_first, em_first, rules_first = score(items, gens, "first-line")
    assert (acc_first, em_first) == (0.5, 0.5)
    assert [r["correct"] for r in rec_first] == [True, False, True, False]
    assert rules_first == {"exact": 2, "substring": 0, "words": 0, "none": 2}
    rec_thesis, acc_thesis, em_thesis, rules_thesis = score(items, gens, "thesis")
    assert (acc_thesis, em_thesis) == (0.75, 0.25)
    assert [r["rule"] for r in rec_thesis] == ["substring", "substring", "exact", None]
    assert rec_thesis[1]["prediction"] == "I think\nit was William Shakespeare."
    assert [r["first_line_correct"] for r in rec_thesis] == [True, False, True, False]  # the other protocol, beside


def test_wilson_interval():
    lo, hi = wilson(19, 200)  # the bundled model's 9.5 % of 200 closed-book questions
    assert (round(lo, 4), round(hi, 4)) == (
        0.0617,
        0.1436,
    )  # by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert wilson(0, 10)[0] == 0.0 and 0.27 < wilson(0, 10)[1] < 0.28  # honest at 0 of n
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    assert format_accuracy(0.095, 200) == "9.5 % (19/200, 95 % CI 6.2-14.4 %)"
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_first_line():
    assert first_line(" Paris\nQuestion: next") == "Paris"
    assert first_line("\n \nParis\nLondon") == "Paris"  # leading blank lines are not the answer
    assert first_line("no newline ") == "no newline"
