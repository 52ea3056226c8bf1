"""Answer metrics with SQuAD's normalisation, as used by SoLoPO (sub-EM) and the long-context QA
benchmarks (LongBench/RULER-style F1 and substring match).

``normalize_answer``: lower case, punctuation removed, the articles ``a``/``an``/``the`` removed,
whitespace collapsed (the official SQuAD v1.1 evaluation script's ``normalize_answer``).

- ``exact_match(prediction, golds)``: 1.0 if the normalised prediction equals a normalised gold;
- ``sub_em(prediction, golds)``: 1.0 if a normalised gold (answer or alias) is a substring of the
  normalised prediction (the papers' "substring exact match"); ``whole_words=True`` matches only
  runs of whole words (``"7"`` is then not found in ``"17"``);
- ``f1(prediction, golds)``: the best bag-of-tokens F1 over the golds.

``golds`` is a string or a list of strings (the answer and its aliases); empty golds never match.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Union

Golds = Union[str, Iterable[str]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: Golds) -> list[str]:
    items = [golds] if isinstance(golds, str) else list(golds)
    normalized = [normalize_answer(g) for g in items if isinstance(g, str)]
    return [g for g in normalized if g]


def exact_match(prediction: str, golds: Golds) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == gold for gold in _golds(golds)))


def sub_em(prediction: str, golds: Golds, whole_words: bool = False) -> float:
    """1.0 if a normalised gold is contained in the normalised prediction."""
    if whole_words:
        pred = f" {normalize_answer(prediction)} "
        return float(any(f" {gold} " in pred for gold in _golds(golds)))
    pred = normalize_answer(prediction)
    return float(any(gold in pred for gold in _golds(golds)))


def f1(prediction: str, golds: Golds) -> float:
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in _golds(golds):
        gold_tokens = gold.split()
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if not overlap:
            continue
        precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


METRICS = {"sub_em": sub_em, "exact_match": exact_match, "f1": f1}
