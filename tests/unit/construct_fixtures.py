"""Inputs for the construction tests: long documents (LongPO) and MuSiQue/HotpotQA-layout QA
records (SoLoPO), deterministic, made of the synthetic tasks' vocabulary (the tiny tokenizers
know it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = ["Aston", "Belford", "Corvin", "Dunmere", "Elsby", "Farrow", "Glenholt", "Harwick"]
NOUNS = ["river", "garden", "village", "mountain", "road", "forest", "harbor", "market"]
ADJECTIVES = ["quiet", "old", "small", "bright", "cold", "green", "tall", "slow"]
VERBS = ["crosses", "faces", "follows", "borders", "shelters", "overlooks", "joins", "hides"]


def sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} near {rng.choice(CITIES)}.")


def paragraph(rng: random.Random, num_sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(num_sentences))


def write_documents(path: Path, num_docs: int = 4, num_paragraphs: int = 8, seed: int = 0,
                    sentences_per_paragraph: int = 4) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as out:
        for index in range(num_docs):
            text = "\n\n".join(paragraph(rng, sentences_per_paragraph)
                               for _ in range(num_paragraphs))
            out.write(json.dumps({"id": f"doc-{index}", "text": text}) + "\n")
    return path


def musique_record(rng: random.Random, index: int, answer: str, num_paragraphs: int = 6) -> dict:
    supporting = rng.sample(range(num_paragraphs), 2)
    paragraphs = []
    for number in range(num_paragraphs):
        text = paragraph(rng, 2)
        if number == supporting[0]:
            text += f" The code of the {NOUNS[index % len(NOUNS)]} is {answer}."
        paragraphs.append({"idx": number, "title": f"Place {index}-{number}",
                           "paragraph_text": text, "is_supporting": number in supporting})
    return {"id": f"q-{index}", "question": f"What is the code of the {NOUNS[index % len(NOUNS)]}?",
            "answer": answer, "answer_aliases": [], "answerable": True, "paragraphs": paragraphs}


def write_musique(path: Path, answers, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as out:
        for index, answer in enumerate(answers):
            out.write(json.dumps(musique_record(rng, index, answer)) + "\n")
    return path


def to_hotpotqa(record: dict) -> dict:
    """The same record in HotpotQA's layout."""
    return {"_id": record["id"], "question": record["question"], "answer": record["answer"],
            "context": [[p["title"], [p["paragraph_text"]]] for p in record["paragraphs"]],
            "supporting_facts": [[p["title"], 0] for p in record["paragraphs"] if p["is_supporting"]]}


def even_length_score(prediction: str, golds) -> float:
    """A ``--score module:function`` for tests: deterministic, about half of random texts pass."""
    return float(len(prediction) % 2 == 0)
