"""Answer metrics with SQuAD's normalisation (megatron_solopo/evaluation/metrics.py)."""

import pytest

from megatron_solopo.evaluation.metrics import exact_match, f1, normalize_answer, sub_em


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an  apple, a PEAR; the plum ", "apple pear plum"),
    ("Theatre", "theatre"),  # "the" inside a word stays
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_sub_em_articles_punctuation_case():
    assert sub_em("I think it is the Eiffel Tower.", "Eiffel tower") == 1.0
    assert sub_em("so: EIFFEL-TOWER", "the eiffel tower") == 0.0  # '-' removed: 'eiffeltower'
    assert sub_em("Answer: Lyon", "lyon!") == 1.0
    assert sub_em("Answer: Paris", "Lyon") == 0.0


def test_sub_em_aliases_and_empty_golds():
    assert sub_em("He was born in NYC.", ["New York City", "NYC"]) == 1.0
    assert sub_em("He was born in Boston.", ["New York City", "NYC"]) == 0.0
    assert sub_em("anything", ["", "the"]) == 0.0  # empty after normalisation never matches


def test_sub_em_substring_vs_whole_words():
    assert sub_em("in 1978", "7") == 1.0  # the papers' substring match
    assert sub_em("in 1978", "7", whole_words=True) == 0.0
    assert sub_em("it is 7 days", "7", whole_words=True) == 1.0


def test_exact_match_and_f1():
    assert exact_match("The Lyon.", ["lyon"]) == 1.0
    assert exact_match("in Lyon", ["lyon"]) == 0.0
    assert f1("in Lyon", "Lyon") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("the cat sat", ["dog", "a cat sat"]) == 1.0
    assert f1("", "x") == 0.0
    assert f1("abc", "xyz") == 0.0
