"""SoLoPO's pairs (papers.md 2.6): QA records with marked evidence -> short context (the
supporting paragraphs), long context (the same paragraphs among distractors, RULER-style, up to a
token length), ``num_samples`` answers sampled on the short context, scored against the gold
answer and its aliases; chosen = a correct answer, rejected = an incorrect one.

Selection rule: the text after the last ``answer_prefix`` ("Answer:") is scored (the whole answer
when the prefix is absent); a sample is correct when its score reaches ``score_threshold``.
Chosen is drawn at random (seeded) among the correct samples that pass the answer filters (not
empty, not repetitive, no refusal phrase); rejected at random among the non-empty incorrect ones
that differ from it. Records without such a pair are dropped and counted: ``no_correct_sample``
(no sample is correct), ``correct_samples_filtered`` (every correct one failed a filter),
``no_incorrect_sample``.

Long context: the record's own paragraphs, then paragraphs drawn from other records (never one
that contains a gold answer, never one with a supporting paragraph's title), added while the
total stays within ``long_length`` tokens, then shuffled: the evidence lands at random positions,
recorded as ``evidence_spans`` (character offsets into ``long_context``).
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from typing import Callable, Optional

from megatron_solopo.construct.inputs import InputFiles
from megatron_solopo.construct.qa_formats import qa_parser
from megatron_solopo.construct.runner import CountingGenerator, Pipeline, Stats, request
from megatron_solopo.construct.text import AnswerFilter, Templates
from megatron_solopo.data.tokenizers import user_text
from megatron_solopo.evaluation.metrics import METRICS, normalize_answer
from megatron_solopo.generation import SamplingParams

PARAGRAPH_JOIN = "\n\n"
# Draws from the other records' paragraphs that may fail in a row (too long, excluded) before
# the long context is taken as full.
_MAX_FAILED_DRAWS = 64


def load_scorer(name: str) -> Callable:
    """``sub_em``, ``f1``, ``exact_match`` or ``package.module:function`` taking (prediction,
    golds) and returning a number (or bool)."""
    if name in METRICS:
        return METRICS[name]
    if ":" not in name:
        raise ValueError(f"--score {name!r}; valid: {', '.join(METRICS)}, or module:function")
    module_name, function_name = name.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--score {name}: cannot load it ({err})") from None
    if not callable(function):
        raise ValueError(f"--score {name}: not a function")
    return function


@dataclasses.dataclass
class SoLoPOSettings:
    """The recipe's knobs (defaults: the paper's)."""

    long_length: Optional[int] = None
    """Long context size in tokens (paper: ~7.5K average); None: the record's own paragraphs."""
    short_distractors: int = 0
    """Non-supporting paragraphs of the record added to the short context too."""
    sampling: SamplingParams = SamplingParams(temperature=0.85, top_p=1.0, max_new_tokens=1024,
                                              n=32)
    """Short-context samples (paper: 32 chain-of-thought samples at temperature 0.85)."""
    long_samples: int = 0
    """Also sample this many on the long context (Long-DPO / expand-long baselines' pairs in
    meta.long_pair); 0: no long sampling."""
    score: str = "sub_em"
    """sub_em, f1, exact_match, or module:function(prediction, golds) -> number."""
    score_threshold: float = 1.0
    """A sample is correct when its score reaches this."""
    answer_prefix: Optional[str] = "Answer:"
    """Score the text after its last occurrence (the whole answer when absent); None: always
    the whole answer."""
    max_repetition: float = 0.9
    """Correct samples with a higher repeated-word ratio cannot be chosen."""
    seed: int = 0
    """Every random choice (distractors, positions, the pair) derives from it and the id."""


class SoLoPOPipeline(Pipeline):
    name = "solopo"

    def __init__(self, inputs: list, settings: SoLoPOSettings, templates: Templates,
                 qa_format: str = "musique"):
        if settings.short_distractors < 0 or settings.long_samples < 0:
            raise ValueError("--short-distractors and --long-samples must be >= 0")
        if settings.long_length is not None and settings.long_length < 1:
            raise ValueError(f"--long-length must be >= 1, got {settings.long_length}")
        self.config = settings
        self.scorer = load_scorer(settings.score)
        self.templates = templates
        templates.fill("solopo_question.txt", question="")
        # No minimum of long words: a correct answer may be one short word ("Paris").
        self.filter = AnswerFilter(templates.lines("refusal_phrases.txt"), settings.max_repetition,
                                   min_long_words=0)
        self.format = qa_format
        self.inputs = InputFiles(inputs, qa_parser(qa_format))
        self.inputs.check()
        self._pool: Optional[list] = None  # (item id, title, rendered text), deduplicated
        self._token_cache: dict = {}

    def settings(self) -> dict:
        return {"pipeline": self.name, "inputs": self.inputs.fingerprints, "format": self.format,
                "recipe": dataclasses.asdict(self.config), "templates": self.templates.describe()}

    def items(self):
        return self.inputs.items()

    # ------------------------------------------------------------------------------------------
    def _tokens(self, generator, text: str) -> int:
        if text not in self._token_cache:
            self._token_cache[text] = generator.count_tokens(text)
        return self._token_cache[text]

    def pool(self) -> list:
        if self._pool is None:
            seen, pool = set(), []
            for _, item_id, item in self.inputs.items():
                for paragraph in item.paragraphs:
                    text = paragraph.render()
                    if text not in seen:
                        seen.add(text)
                        pool.append((item_id, paragraph.title, text))
            self._pool = pool
        return self._pool

    def contexts(self, item_id: str, item, generator) -> tuple[str, str, list] | str:
        """``(short, long, evidence spans)``, or the reason the item is dropped."""
        config = self.config
        rng = random.Random(f"{config.seed}:{item_id}:contexts")
        supporting = [p.render() for p in item.paragraphs if p.is_supporting]
        if not supporting:
            return "no_supporting_paragraph"
        own = [p.render() for p in item.paragraphs if not p.is_supporting]
        rng.shuffle(own)
        short_extra = own[:config.short_distractors]
        short = PARAGRAPH_JOIN.join(supporting + short_extra)
        chosen = list(short_extra)
        if config.long_length is None:
            chosen += own[config.short_distractors:]
        else:
            budget = config.long_length
            # Each paragraph is counted with the separator that joins it to the next.
            separator = self._tokens(generator, PARAGRAPH_JOIN)
            used = sum(self._tokens(generator, t) + separator for t in supporting + short_extra)
            if used > budget:
                return "evidence_over_long_length"
            golds = [g for g in (normalize_answer(a) for a in item.answers) if g]
            titles = {p.title for p in item.paragraphs if p.is_supporting and p.title}
            taken = set(supporting + chosen)
            candidates = iter(own[config.short_distractors:])
            pool, failures = self.pool(), 0
            while failures < _MAX_FAILED_DRAWS:
                text = next(candidates, None)
                if text is None:  # the record's own distractors are used up: other records'
                    source, title, text = pool[rng.randrange(len(pool))]
                    if source == item_id or title in titles or text in taken or (
                            golds and any(g in normalize_answer(text) for g in golds)):
                        failures += 1
                        continue
                tokens = self._tokens(generator, text) + separator
                if used + tokens > budget or text in taken:
                    failures += 1
                    continue
                chosen.append(text)
                taken.add(text)
                used += tokens
        paragraphs = [(text, True) for text in supporting] + [(text, False) for text in chosen]
        rng.shuffle(paragraphs)
        spans, position = [], 0
        for text, is_evidence in paragraphs:
            if is_evidence:
                spans.append([position, position + len(text)])
            position += len(text) + len(PARAGRAPH_JOIN)
        long = PARAGRAPH_JOIN.join(text for text, _ in paragraphs)
        return short, long, spans

    def _score(self, text: str, answers: list) -> float:
        prefix = self.config.answer_prefix
        if prefix and prefix in text:
            text = text.rsplit(prefix, 1)[1]
        return float(self.scorer(text, answers))

    def _pair(self, texts: list, answers: list, rng: random.Random):
        """``(chosen, rejected, number correct, drop reason)`` by the selection rule (module
        docstring); chosen and rejected are None when the record is dropped."""
        is_correct = [self._score(t, answers) >= self.config.score_threshold for t in texts]
        num_correct = sum(is_correct)
        correct = [t for t, ok in zip(texts, is_correct) if ok and self.filter.reason(t) is None]
        if not correct:
            return None, None, num_correct, ("no_correct_sample" if not num_correct
                                             else "correct_samples_filtered")
        chosen = rng.choice(correct)
        incorrect = [t for t, ok in zip(texts, is_correct)
                     if not ok and t.strip() and t.strip() != chosen.strip()]
        if not incorrect:
            return None, None, num_correct, "no_incorrect_sample"
        return chosen, rng.choice(incorrect), num_correct, None

    def process(self, block: list, generator: CountingGenerator, stats: Stats) -> list:
        config = self.config
        prepared = []
        for index, item_id, item in block:
            if item.skip:
                stats.dropped[item.skip] += 1
                continue
            built = self.contexts(item_id, item, generator)
            if isinstance(built, str):
                stats.dropped[built] += 1
                continue
            short, long, spans = built
            prompt = self.templates.fill("solopo_question.txt", question=item.question)
            prepared.append((index, item_id, item, prompt, short, long, spans))
        completions = generator.generate([request(
            user_text(short, prompt), config.sampling, f"{item_id}/short")
            for _, item_id, _, prompt, short, _, _ in prepared], desc="short-context samples")
        long_completions = [None] * len(prepared)
        if config.long_samples:
            long_params = dataclasses.replace(config.sampling, n=config.long_samples)
            long_completions = generator.generate([request(
                user_text(long, prompt), long_params, f"{item_id}/long")
                for _, item_id, _, prompt, _, long, _ in prepared], desc="long-context samples")
        records = []
        for (index, item_id, item, prompt, short, long, spans), completion, long_completion in zip(
                prepared, completions, long_completions):
            rng = random.Random(f"{config.seed}:{item_id}:pair")
            chosen, rejected, num_correct, reason = self._pair(completion.texts, item.answers, rng)
            stats.sums["correct_samples"] += num_correct
            stats.sums["scored_samples"] += len(completion.texts)
            if reason:
                stats.dropped[reason] += 1
                continue
            short_tokens = generator.count_tokens(short)
            long_tokens = generator.count_tokens(long)
            stats.sums["short_tokens"] += short_tokens
            stats.sums["long_tokens"] += long_tokens
            meta = {"source": "solopo", "answers": item.answers, "num_samples": len(completion.texts),
                    "num_correct": num_correct, "short_tokens": short_tokens,
                    "long_tokens": long_tokens,
                    "compression_ratio": round(short_tokens / max(long_tokens, 1), 4)}
            if long_completion is not None:
                long_rng = random.Random(f"{config.seed}:{item_id}:long_pair")
                long_chosen, long_rejected, long_correct, _ = self._pair(
                    long_completion.texts, item.answers, long_rng)
                meta["long_num_correct"] = long_correct
                meta["long_pair"] = ({"chosen": long_chosen, "rejected": long_rejected}
                                     if long_chosen is not None else None)
            records.append((index, {"id": item_id, "prompt": prompt, "short_context": short,
                                    "long_context": long, "chosen": chosen, "rejected": rejected,
                                    "evidence_spans": spans, "meta": meta}))
        return records

    def describe(self, stats: Stats) -> dict:
        sums = stats.sums
        kept = max(stats.records, 1)
        return {
            "compression_ratio": round(sums["short_tokens"] / max(sums["long_tokens"], 1), 4),
            "mean_short_tokens": round(sums["short_tokens"] / kept, 1),
            "mean_long_tokens": round(sums["long_tokens"] / kept, 1),
            "sample_accuracy": round(sums["correct_samples"] / max(sums["scored_samples"], 1), 4),
        }
