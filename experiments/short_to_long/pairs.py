"""Preference pairs made by the SFT model itself, with the generation backends
(``megatron_solopo.generation``) and the answer metrics (``megatron_solopo.evaluation.metrics``).

- SoLoPO (also used by short-only DPO and by Long-DPO, which trains the same pairs on the long
  context: the SoLoPO paper's "expand-long" baseline): ``num_samples`` answers sampled on the
  short context (the evidence); sub-EM against the gold answer; chosen = a correct sample,
  rejected = an incorrect one, both drawn at random (seeded). A question with no correct or no
  incorrect sample gives no pair (the paper's rule), and is counted.
- LongPO: chosen = the greedy answer given the short context (for these tasks the chunk is the
  evidence), rejected = the greedy answer given the long context. No gold answer is used (LongPO
  has none); pairs whose two answers are equal after normalisation, or empty, are dropped.

``fallback=True`` (the smoke-test sizes only, where the model is untrained) gives a question without
a self-made pair the synthetic record's chosen/rejected instead, counted as ``fallback``.

Records follow docs/data.md (both contexts); ``meta`` keeps the gold answer and the scores.
"""

from __future__ import annotations

import random
from typing import Sequence

from megatron_solopo.data import synthetic
from megatron_solopo.data.tokenizers import user_text
from megatron_solopo.evaluation.metrics import normalize_answer, sub_em
from megatron_solopo.evaluation.tasks import short_words


def prompt_records(tasks: Sequence[str], per_task: int, long_multiplier: int, seed: int) -> list[dict]:
    """Synthetic questions with a short context and a long one of ``long_multiplier`` times the
    task's short length."""
    records = []
    for number, task in enumerate(tasks):
        long_words = max(1, round(long_multiplier * short_words(task)))
        for record in synthetic.generate_records(task, per_task, seed=seed * 1000 + number,
                                                 long_length=long_words):
            record["id"] = f"s{seed}-{record['id']}"
            records.append(record)
    return records


def _pair(record: dict, chosen: str, rejected: str, source: str) -> dict:
    return {"id": record["id"], "prompt": record["prompt"], "short_context": record["short_context"],
            "long_context": record["long_context"], "chosen": chosen, "rejected": rejected,
            "meta": {"task": record["meta"]["task"], "answer": record["meta"]["answer"],
                     "source": source}}


def _request(context: str, record: dict, params):
    from megatron_solopo.generation import GenerationRequest

    return GenerationRequest([{"role": "user", "content": user_text(context, record["prompt"])}],
                             params, key=f"{record['id']}")


def solopo_pairs(generator, records: Sequence[dict], *, num_samples: int, temperature: float,
                 max_new_tokens: int, seed: int, fallback: bool = False) -> tuple[list[dict], dict]:
    from megatron_solopo.generation import SamplingParams

    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=num_samples)
    completions = generator.generate([_request(r["short_context"], r, params) for r in records],
                                     desc="SoLoPO samples (short context)")
    rng = random.Random(seed)
    pairs, stats = [], {"questions": len(records), "no_correct_sample": 0,
                        "no_incorrect_sample": 0, "samples": 0, "correct_samples": 0,
                        "fallback": 0}
    for record, completion in zip(records, completions):
        gold = record["meta"]["answer"]
        texts = [t for t in completion.texts if t.strip()]
        correct = [t for t in texts if sub_em(t, gold)]
        stats["samples"] += len(completion.texts)
        stats["correct_samples"] += len(correct)
        chosen = rng.choice(correct) if correct else None
        incorrect = [t for t in texts if not sub_em(t, gold) and t.strip() != (chosen or "").strip()]
        if chosen is None or not incorrect:
            stats["no_correct_sample" if chosen is None else "no_incorrect_sample"] += 1
            if fallback:
                stats["fallback"] += 1
                pairs.append(_pair(record, record["chosen"], record["rejected"], "synthetic"))
            continue
        pairs.append(_pair(record, chosen, rng.choice(incorrect), "model"))
    stats["pairs"] = len(pairs)
    stats["short_sample_accuracy"] = stats["correct_samples"] / max(stats["samples"], 1)
    return pairs, stats


def longpo_pairs(generator, records: Sequence[dict], *, max_new_tokens: int,
                 fallback: bool = False) -> tuple[list[dict], dict]:
    from megatron_solopo.generation import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    short = generator.generate([_request(r["short_context"], r, params) for r in records],
                               desc="LongPO chosen (short context)")
    long = generator.generate([_request(r["long_context"], r, params) for r in records],
                              desc="LongPO rejected (long context)")
    pairs, stats = [], {"questions": len(records), "empty": 0, "same_answer": 0,
                        "chosen_correct": 0, "rejected_correct": 0, "fallback": 0}
    for record, chosen, rejected in zip(records, short, long):
        chosen, rejected = chosen.texts[0].strip(), rejected.texts[0].strip()
        gold = record["meta"]["answer"]
        stats["chosen_correct"] += int(sub_em(chosen, gold))
        stats["rejected_correct"] += int(sub_em(rejected, gold))
        problem = ("empty" if not chosen or not rejected else
                   "same_answer" if normalize_answer(chosen) == normalize_answer(rejected) else None)
        if problem:
            stats[problem] += 1
            if fallback:
                stats["fallback"] += 1
                pairs.append(_pair(record, record["chosen"], record["rejected"], "synthetic"))
            continue
        pairs.append(_pair(record, chosen, rejected, "model"))
    stats["pairs"] = len(pairs)
    return pairs, stats
