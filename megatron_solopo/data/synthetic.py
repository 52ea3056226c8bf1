"""Synthetic long-context preference tasks (no downloads); records in the schema of docs/data.md.

- ``multidoc_qa``: one-sentence documents state where invented people were born and what they
  worked as; the question asks about one of them. Short context: the gold document and one other
  person's; long context: every person's document hidden at random places among distractor
  documents (about other invented people, never the asked one) up to the target length.
- ``kv_retrieval``: ``key <k> has value <n>`` lines; the question asks for one key's value. Short
  context: the six lines of the record's own keys; long context: those among many more lines with
  other keys (every key appears once).
- ``needle``: filler sentences (a haystack) with "the secret number of the <color> <animal> is
  <n>" needles at random depths. Short context: the needle's paragraph; long context: the whole
  haystack.

Chosen is the correct answer; rejected a wrong one (another key's value, another document's
fact) or an evasive reply, half and half. ``num_turns > 1`` asks several questions about one long
context (LongPO's multi-turn form), each turn with its own short context. Answers are short and
the vocabulary small, so a tiny model learns the preference in a few dozen steps (the demo relies
on it). Lengths are in words (``words_for_tokens`` converts from tokens). Deterministic in
``seed``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable

TASKS = ("multidoc_qa", "kv_retrieval", "needle")

_SYLLABLES = ["ka", "lo", "mi", "ra", "te", "no", "vi", "sa", "du", "pe", "zo", "ha", "bu", "ri",
              "go", "la", "fe", "ni", "to", "ma"]
_CITIES = ["Aston", "Belford", "Corvin", "Dunmere", "Elsby", "Farrow", "Glenholt", "Harwick",
           "Ilford", "Jarrow", "Kelso", "Lanark", "Morley", "Newark", "Oakham", "Penrith"]
_JOBS = ["baker", "pilot", "painter", "farmer", "doctor", "sailor", "teacher", "miner", "judge",
         "weaver", "potter", "singer"]
_EVASIVE = ["The documents do not say.", "I cannot find this in the text.",
            "There is not enough information to answer.", "It is not mentioned anywhere."]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_ANIMALS = ["fox", "owl", "cat", "horse", "whale", "crow", "goat", "bear"]
_ADJECTIVES = ["quiet", "old", "small", "bright", "cold", "green", "tall", "slow", "warm", "dark"]
_NOUNS = ["river", "garden", "village", "mountain", "road", "forest", "harbor", "market", "field",
          "bridge", "tower", "valley"]
_VERBS = ["crosses", "faces", "follows", "borders", "shelters", "overlooks", "joins", "hides"]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def _fill(words_target: int, gold: list[str], make_distractor: Callable[[], str],
          rng: random.Random, separator: str = "\n") -> str:
    """``gold`` paragraphs hidden at random positions among distractors, ~``words_target`` words."""
    paragraphs = list(gold)
    count = sum(len(p.split()) for p in paragraphs)
    while count < words_target:
        distractor = make_distractor()
        paragraphs.append(distractor)
        count += len(distractor.split())
    rng.shuffle(paragraphs)
    return separator.join(paragraphs)


def _rejected(rng: random.Random, wrong_answers: list[str], phrase: Callable[[str], str]) -> str:
    """An evasive reply or a wrong answer, half and half."""
    wrong = rng.choice(wrong_answers) if wrong_answers else None
    if wrong is None or rng.random() < 0.5:
        return rng.choice(_EVASIVE)
    return phrase(wrong)


def _record(task: str, index: int, turns: list[dict], long_context: str) -> dict:
    prefix = {"multidoc_qa": "mdqa", "kv_retrieval": "kv", "needle": "needle"}[task]
    record = {"id": f"{prefix}-{index}", "long_context": long_context}
    answers = [turn.pop("answer") for turn in turns]
    if len(turns) == 1:
        record.update(turns[0])
        record["meta"] = {"task": task, "answer": answers[0]}
    else:
        record["turns"] = turns
        record["meta"] = {"task": task, "answers": answers}
    return record


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------
def _fact(rng: random.Random, person: str) -> tuple[str, dict]:
    city, job = rng.choice(_CITIES), rng.choice(_JOBS)
    return f"Document: {person} was born in {city} and worked as a {job}.", {"city": city, "job": job}


def multidoc_qa_record(rng: random.Random, index: int, long_length: int, num_turns: int = 1) -> dict:
    people = sorted({_name(rng) for _ in range(max(12, 2 * num_turns))})
    facts = {person: _fact(rng, person) for person in people}
    turns = []
    for target in rng.sample(people, num_turns):
        attribute = rng.choice(["city", "job"])
        verb = "was born in" if attribute == "city" else "worked as a"
        answer = facts[target][1][attribute]
        wrong = sorted({facts[p][1][attribute] for p in people if p != target} - {answer})
        other = rng.choice([p for p in people if p != target])
        documents = [facts[target][0], facts[other][0]]
        rng.shuffle(documents)
        turns.append({
            "prompt": f"Where was {target} born?" if attribute == "city" else f"What did {target} work as?",
            "short_context": "\n".join(documents),
            "chosen": f"{target} {verb} {answer}.",
            "rejected": _rejected(rng, wrong, lambda value: f"{target} {verb} {value}."),
            "answer": answer,
        })

    def distractor() -> str:
        person = _name(rng)
        while person in facts:  # never a second, contradicting document about an asked person
            person = _name(rng)
        return _fact(rng, person)[0]

    long_context = _fill(long_length, [facts[p][0] for p in people], distractor, rng)
    return _record("multidoc_qa", index, turns, long_context)


def _key_syllables(long_length: int) -> int:
    """Syllables per key, so that the key space is >= 4x the lines a context needs (every key
    must be unique within a record)."""
    lines = long_length // 5 + 6  # "key <k> has value <n>": 5 words
    syllables = 2
    while len(_SYLLABLES) ** syllables < 4 * lines:
        syllables += 1
    return syllables


def kv_retrieval_record(rng: random.Random, index: int, long_length: int, num_turns: int = 1) -> dict:
    syllables = _key_syllables(long_length)

    def new_pair() -> tuple[str, str]:
        return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)), str(rng.randint(100, 999))

    pairs: dict[str, str] = {}
    while len(pairs) < max(6, num_turns + 2):
        key, value = new_pair()
        pairs.setdefault(key, value)
    keys = sorted(pairs)
    lines = [f"key {k} has value {pairs[k]}" for k in keys]
    targets = [rng.choice(keys)] if num_turns == 1 else rng.sample(keys, num_turns)

    def distractor() -> str:
        while True:
            key, value = new_pair()
            if key not in pairs:
                pairs[key] = value
                return f"key {key} has value {value}"

    long_context = _fill(long_length, lines, distractor, rng)
    turns = []
    for target in targets:
        wrong = [pairs[k] for k in keys if k != target and pairs[k] != pairs[target]]
        if num_turns == 1:
            short = "\n".join(lines)
        else:  # each turn its own chunk: the asked line and its neighbours
            at = keys.index(target)
            short = "\n".join(lines[max(0, at - 1):at + 2])
        turns.append({
            "prompt": f"What is the value of key {target}?",
            "short_context": short,
            "chosen": f"The value of key {target} is {pairs[target]}.",
            "rejected": _rejected(rng, wrong, lambda value: f"The value of key {target} is {value}."),
            "answer": pairs[target],
        })
    return _record("kv_retrieval", index, turns, long_context)


def _filler(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}.")


def needle_record(rng: random.Random, index: int, long_length: int, num_turns: int = 1) -> dict:
    names = rng.sample([(c, a) for c in _COLORS for a in _ANIMALS], max(3, num_turns))
    numbers = rng.sample(range(100, 1000), len(names))
    needles = {name: str(number) for name, number in zip(names, numbers)}
    # A needle's paragraph: filler sentences around it (the short context of that needle).
    paragraphs = {}
    for (color, animal), number in needles.items():
        sentences = [_filler(rng) for _ in range(3)]
        sentences.insert(rng.randint(0, 3), f"The secret number of the {color} {animal} is {number}.")
        paragraphs[(color, animal)] = " ".join(sentences)

    def distractor() -> str:
        return " ".join(_filler(rng) for _ in range(4))

    long_context = _fill(long_length, list(paragraphs.values()), distractor, rng, separator="\n\n")
    turns = []
    for color, animal in names[:num_turns]:
        answer = needles[(color, animal)]
        wrong = [n for key, n in needles.items() if key != (color, animal)]
        turns.append({
            "prompt": f"What is the secret number of the {color} {animal}?",
            "short_context": paragraphs[(color, animal)],
            "chosen": f"The secret number of the {color} {animal} is {answer}.",
            "rejected": _rejected(rng, wrong, lambda value: f"The secret number of the {color} "
                                                            f"{animal} is {value}."),
            "answer": answer,
        })
    return _record("needle", index, turns, long_context)


_GENERATORS = {"multidoc_qa": multidoc_qa_record, "kv_retrieval": kv_retrieval_record,
               "needle": needle_record}


def generate_records(task: str, num_records: int, *, seed: int = 0, long_length: int = 1000,
                     num_turns: int = 1) -> list[dict]:
    """``num_records`` records of ``task`` with long contexts of about ``long_length`` words."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}; valid: {', '.join(TASKS)}")
    if long_length < 1:
        raise ValueError(f"--long-length must be >= 1, got {long_length}")
    if not 1 <= num_turns <= 8:
        raise ValueError(f"--num-turns must be in [1, 8], got {num_turns}")
    rng = random.Random(seed)
    return [_GENERATORS[task](rng, index, long_length, num_turns) for index in range(num_records)]


def words_for_tokens(task: str, num_tokens: int, tokenizer, *, seed: int = 12345) -> int:
    """The ``long_length`` (words) whose long contexts come out at about ``num_tokens`` tokens
    with ``tokenizer`` (a PreferenceTokenizer), measured on a few sample records."""
    sample_words = 2000
    records = generate_records(task, 4, seed=seed, long_length=sample_words)
    tokens = sum(len(tokenizer.encode_text(r["long_context"])) for r in records)
    words = sum(len(r["long_context"].split()) for r in records)
    return max(1, round(num_tokens * words / tokens))


def write_jsonl(records: Iterable[dict], path: str) -> None:
    """Atomic JSONL write."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Text covering the synthetic tasks' vocabulary, to train tiny tokenizers on."""
    rng = random.Random(seed)
    lines: list[str] = []
    for index in range(num_lines // 20):
        for make in _GENERATORS.values():
            record = make(rng, index, 40)
            lines.extend(record["long_context"].split("\n"))
            lines.extend([record["prompt"], record["chosen"], record["rejected"]])
    lines.extend(_EVASIVE)
    # Every printable ASCII character, so that test texts beyond the tasks never hit <unk>.
    lines.append(" ".join(chr(code) for code in range(33, 127)))
    return lines


# The tiny tokenizers live in tiny_tokenizers.py; re-exported here, where the demo looks for them.
from megatron_solopo.data.tiny_tokenizers import (CHAT_TEMPLATE, make_hf_tokenizer,  # noqa: E402,F401
                                                  train_sentencepiece_tokenizer)
