"""Evaluation examples: a question, its gold answer(s) and a context, in a length bucket.

Sources:

- ``synthetic_examples``: the tasks of ``data/synthetic.py`` at multiples of their short length.
  Bucket ``1x`` is the record's short context (the evidence only, what short-context training
  sees); bucket ``kx`` (k > 1) is a long context of about k times the task's mean short-context
  words, the evidence hidden among distractors. The ``1x`` bucket is the short-context retention
  score (``report.py``).
- ``jsonl_examples``: any JSONL file whose lines have a question, the answer(s) and a context
  (field names below), e.g. the records ``tools/make_synthetic_data.py`` writes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Optional, Sequence

from megatron_solopo.data import synthetic
from megatron_solopo.data.tokenizers import user_text

QUESTION_FIELDS = ("question", "prompt", "input")
ANSWER_FIELDS = ("answers", "answer", "gold", "golds", "outputs")
CONTEXT_FIELDS = ("context", "long_context", "short_context")


@dataclasses.dataclass
class EvalExample:
    """One question to answer."""

    id: str
    task: str
    length: str  # the bucket's label ("1x", "2x", ..., or the file's "length" field)
    question: str
    answers: list  # gold answer and aliases
    context: Optional[str] = None
    system: Optional[str] = None

    def messages(self) -> list:
        user = {"role": "user", "content": user_text(self.context, self.question)}
        return ([{"role": "system", "content": self.system}] if self.system else []) + [user]


def parse_multipliers(text: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8] (integers >= 1, no repeats)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--lengths {text!r}: give integers >= 1 separated by commas, e.g. "
                         f"1,2,4,8") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"--lengths {text!r}: give distinct integers >= 1, e.g. 1,2,4,8")
    return values


def short_words(task: str, seed: int = 4321) -> float:
    """Mean words of the task's short contexts (the unit of the length multipliers)."""
    records = synthetic.generate_records(task, 32, seed=seed, long_length=1)
    return sum(len(r["short_context"].split()) for r in records) / len(records)


def synthetic_examples(task: str, num_examples: int, multipliers: Sequence[int], *,
                       seed: int = 0) -> list[EvalExample]:
    """``num_examples`` questions of ``task`` per length bucket (fresh records per bucket)."""
    if num_examples < 1:
        raise ValueError(f"--num-examples must be >= 1, got {num_examples}")
    unit = short_words(task)
    examples = []
    for multiplier in multipliers:
        # Each bucket its own records, drawn from a seed that depends on the bucket only.
        bucket_seed = random.Random(f"{seed}/{task}/{multiplier}").randrange(2 ** 31)
        records = synthetic.generate_records(task, num_examples, seed=bucket_seed,
                                             long_length=max(1, round(multiplier * unit)))
        for record in records:
            context = record["short_context"] if multiplier == 1 else record["long_context"]
            examples.append(EvalExample(
                id=f"{task}/{multiplier}x/{record['id']}", task=task, length=f"{multiplier}x",
                question=record["prompt"], answers=[record["meta"]["answer"]], context=context))
    return examples


def _first(row: dict, fields: Sequence[str]):
    for field in fields:
        if row.get(field) not in (None, "", []):
            return field, row[field]
    return None, None


def jsonl_examples(path: str, *, context_field: Optional[str] = None,
                   task: Optional[str] = None) -> list[EvalExample]:
    """Examples from a JSONL file. Per line: a question (``question``, ``prompt`` or ``input``),
    the answer(s) (``answers``, ``answer``, ``gold``, ``golds``, ``outputs``, or
    ``meta.answer(s)`` as in the synthetic records; a string or a list of aliases), a context
    (``context_field``, else ``context``, ``long_context``, ``short_context``; may be absent),
    optional ``id``, ``task``, ``length`` (the bucket; default ``all``) and ``system``."""
    examples, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object")
            if "turns" in row:
                raise ValueError(f"{where}: multi-turn records ('turns') cannot be evaluated; "
                                 f"give one question per line")
            _, question = _first(row, QUESTION_FIELDS)
            if not isinstance(question, str):
                raise ValueError(f"{where}: no question (a string field named one of "
                                 f"{', '.join(QUESTION_FIELDS)})")
            _, answers = _first(row, ANSWER_FIELDS)
            if answers is None and isinstance(row.get("meta"), dict):
                _, answers = _first(row["meta"], ("answers", "answer"))
            answers = [answers] if isinstance(answers, (str, int, float)) else answers
            if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
                raise ValueError(f"{where}: no gold answer (a string or a list of strings in one "
                                 f"of {', '.join(ANSWER_FIELDS)}, or meta.answer)")
            if context_field is not None:
                context = row.get(context_field)
                if context is not None and not isinstance(context, str):
                    raise ValueError(f"{where}: field {context_field!r} is not a string")
            else:
                _, context = _first(row, CONTEXT_FIELDS)
                if context is not None and not isinstance(context, str):
                    raise ValueError(f"{where}: the context is not a string")
            example_id = str(row.get("id", f"line{number}"))
            if example_id in seen:
                raise ValueError(f"{where}: duplicate id {example_id!r}")
            seen.add(example_id)
            meta_task = (row.get("meta") or {}).get("task") if isinstance(row.get("meta"), dict) else None
            examples.append(EvalExample(
                id=example_id, task=str(task or row.get("task") or meta_task or "jsonl"),
                length=str(row.get("length", "all")), question=question,
                answers=[str(a) for a in answers], context=context or None,
                system=row.get("system") if isinstance(row.get("system"), str) else None))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
