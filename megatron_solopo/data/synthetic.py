"""Synthetic long-context preference tasks and tiny tokenizers (no downloads).

Tasks produce records in the schema of docs/data.md:

- ``multidoc_qa``: short documents state facts about invented people; the question asks about one
  of them. The short context is the gold document(s); the long context hides them among
  distractor documents up to a target length. Chosen: the correct answer; rejected: a wrong
  answer taken from a distractor, or an evasive reply.
- ``kv_retrieval``: a list of ``key: value`` lines (needle retrieval); the short context holds the
  queried pair and a few neighbours, the long context many more.

Lengths are in words (about one token per word with the bundled tokenizers). Deterministic in
``seed``. The vocabulary is small and systematic, so a tiny model learns the preference quickly
(the demo and end-to-end tests rely on it).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Optional

TASKS = ("multidoc_qa", "kv_retrieval")

_SYLLABLES = ["ka", "lo", "mi", "ra", "te", "no", "vi", "sa", "du", "pe", "zo", "ha", "bu", "ri",
              "go", "la", "fe", "ni", "to", "ma"]
_CITIES = ["Aston", "Belford", "Corvin", "Dunmere", "Elsby", "Farrow", "Glenholt", "Harwick",
           "Ilford", "Jarrow", "Kelso", "Lanark", "Morley", "Newark", "Oakham", "Penrith"]
_JOBS = ["baker", "pilot", "painter", "farmer", "doctor", "sailor", "teacher", "miner", "judge",
         "weaver", "potter", "singer"]
_EVASIVE = ["The documents do not say.", "I cannot find this in the text.",
            "There is not enough information to answer.", "It is not mentioned anywhere."]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def _fact(rng: random.Random, person: str) -> tuple[str, dict]:
    city, job = rng.choice(_CITIES), rng.choice(_JOBS)
    return (f"{person} was born in {city} and worked as a {job}.",
            {"city": city, "job": job})


def _fill(words_target: int, gold: list[str], make_distractor, rng: random.Random) -> str:
    """Gold paragraphs hidden at random positions among distractors, ~words_target words."""
    paragraphs = list(gold)
    count = sum(len(p.split()) for p in paragraphs)
    while count < words_target:
        distractor = make_distractor()
        paragraphs.append(distractor)
        count += len(distractor.split())
    rng.shuffle(paragraphs)
    return "\n".join(paragraphs)


def multidoc_qa_record(rng: random.Random, index: int, long_length: int) -> dict:
    people = {_name(rng) for _ in range(12)}
    people = sorted(people)
    target = rng.choice(people)
    fact, attributes = _fact(rng, target)
    attribute = rng.choice(["city", "job"])
    question = (f"Where was {target} born?" if attribute == "city"
                else f"What did {target} work as?")
    answer = attributes[attribute]
    others = [p for p in people if p != target]
    distractor_facts = [_fact(rng, p) for p in others]
    wrong_pool = [f[1][attribute] for f in distractor_facts if f[1][attribute] != answer]
    gold = [f"Document: {fact}"]
    short = "\n".join(gold + [f"Document: {distractor_facts[0][0]}"])

    def distractor() -> str:
        person = _name(rng)
        return f"Document: {_fact(rng, person)[0]}"

    long = _fill(long_length, gold + [f"Document: {f[0]}" for f in distractor_facts], distractor, rng)
    rejected = (rng.choice(_EVASIVE) if rng.random() < 0.5 or not wrong_pool
                else f"{target} {'was born in' if attribute == 'city' else 'worked as a'} "
                     f"{rng.choice(wrong_pool)}.")
    chosen = f"{target} {'was born in' if attribute == 'city' else 'worked as a'} {answer}."
    return {"id": f"mdqa-{index}", "prompt": question, "short_context": short,
            "long_context": long, "chosen": chosen, "rejected": rejected,
            "meta": {"task": "multidoc_qa", "answer": answer}}


def _kv_line(rng: random.Random) -> tuple[str, str, str]:
    key = "".join(rng.choice(_SYLLABLES) for _ in range(2))
    value = str(rng.randint(100, 999))
    return key, value, f"key {key} has value {value}"


def kv_retrieval_record(rng: random.Random, index: int, long_length: int) -> dict:
    pairs = {}
    while len(pairs) < 6:
        key, value, _ = _kv_line(rng)
        pairs.setdefault(key, value)
    keys = sorted(pairs)
    target = rng.choice(keys)
    lines = [f"key {k} has value {pairs[k]}" for k in keys]
    short = "\n".join(lines)

    def distractor() -> str:
        while True:
            key, value, line = _kv_line(rng)
            if key not in pairs:
                pairs[key] = value
                return line

    long = _fill(long_length, lines, distractor, rng)
    wrong = rng.choice([pairs[k] for k in keys if k != target])
    rejected = (rng.choice(_EVASIVE) if rng.random() < 0.5
                else f"The value of key {target} is {wrong}.")
    return {"id": f"kv-{index}", "prompt": f"What is the value of key {target}?",
            "short_context": short, "long_context": long,
            "chosen": f"The value of key {target} is {pairs[target]}.", "rejected": rejected,
            "meta": {"task": "kv_retrieval", "answer": pairs[target]}}


def generate_records(task: str, num_records: int, *, seed: int = 0,
                     long_length: int = 1000) -> list[dict]:
    """``num_records`` records of ``task`` with long contexts of about ``long_length`` words."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}; valid: {', '.join(TASKS)}")
    if long_length < 1:
        raise ValueError(f"--long-length must be >= 1, got {long_length}")
    make = multidoc_qa_record if task == "multidoc_qa" else kv_retrieval_record
    rng = random.Random(seed)
    return [make(rng, index, long_length) for index in range(num_records)]


def write_jsonl(records: Iterable[dict], path: str) -> None:
    """Atomic JSONL write."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Text covering the synthetic tasks' vocabulary, to train tiny tokenizers on."""
    rng = random.Random(seed)
    lines = []
    for index in range(num_lines // 20):
        for record in (multidoc_qa_record(rng, index, 40), kv_retrieval_record(rng, index, 40)):
            lines.extend(record["long_context"].split("\n"))
            lines.extend([record["prompt"], record["chosen"], record["rejected"]])
    lines.extend(_EVASIVE)
    lines.append("0 1 2 3 4 5 6 7 8 9 ? . , : ;")
    return lines


def train_sentencepiece_tokenizer(output_dir: str, vocab_size: int = 256,
                                  texts: Optional[list[str]] = None) -> str:
    """A BPE SentencePiece model trained on ``texts`` (default: the synthetic corpus); returns the
    ``.model`` path. Special ids: pad 0, bos 1, eos 2, unk 3."""
    import sentencepiece

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    prefix = os.path.join(output_dir, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts or corpus()), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        byte_fallback=False, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return prefix + ".model"


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_hf_tokenizer(output_dir: str, vocab_size: int = 300,
                      texts: Optional[list[str]] = None) -> str:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad tokens and a chat template,
    saved to ``output_dir`` (loadable offline with ``AutoTokenizer.from_pretrained``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts or corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(output_dir)
    return output_dir
