"""The answer matcher: normalisation and each of the thesis' three rules, with strict EM beside it."""
import pytest

from evals.matching import first_line, match_answer, normalize


@pytest.mark.parametrize("text, expected", [
    ("  The  Mikado! ", "the mikado"),
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
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_rule_wins_over_substring():
    m = match_answer("The Mikado.", ["Mikado", "The Mikado"])
    assert (m.correct, m.rule, m.alias, m.exact_match) == (True, "exact", "The Mikado", True)


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
    m = match_answer("Bagdasarian Ross senior, the man", ["Ross Bagdasarian Senior the Creator"])
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
    assert d == {"correct": True, "exact_match": True, "rule": "exact", "matched_alias": "Onions",
                 "word_fraction": 1.0}


def test_first_line():
    assert first_line(" Paris\nQuestion: next") == "Paris"
    assert first_line("\n \nParis\nLondon") == "Paris"  # leading blank lines are not the answer
    assert first_line("no newline ") == "no newline"
