"""LongPO's self-evolution data (papers.md 1.6; the official generate_qa.py,
generate_longpo_pair.py and postprocess_longpo_pair.py):

1. keep documents of ``[min_doc_tokens, max_doc_tokens]`` tokens;
2. split into paragraphs and greedily group them into chunks of ``[chunk_min_tokens,
   chunk_max_tokens]`` (others dropped); the long context is the kept chunks joined by blank lines;
3. from each chunk the model writes ``num_questions`` questions (temperature 0.7, top-p 0.9,
   1,024 new tokens); an answer that does not parse to exactly that many is dropped (with one
   question asked, an answer without a numbered line is the question itself); one question
   is picked at random and prefixed with a reference phrase ("Based on the preceding text,");
4. chosen = the model's answer given the chunk + question (official code: temperature 1.0);
5. up to ``max_turns`` questions per document are kept (official code: 2), at random;
6. rejected = the model's answer given the whole long context + question (optionally with other
   model settings, e.g. a raised RoPE theta: ``long_generator_factory``);
7. filters: empty, repetitive (repeated-word ratio > 0.9 chosen / > 0.95 rejected, or fewer than
   2 words of 3+ characters), refusal phrases, chosen == rejected;
8. one multi-turn record per document (docs/data.md), turns in document order, each turn with
   its chunk as short context; ``evidence_spans`` are the turns' chunks inside the long context.

Drop reasons count documents (``doc_*``, ``too_few_chunks``, ``no_turn_left``) or questions
(the others).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

from megatron_solopo.construct.inputs import InputFiles, document_parser
from megatron_solopo.construct.runner import CountingGenerator, Pipeline, Stats, request
from megatron_solopo.construct.text import (AnswerFilter, Templates, group_chunks,
                                            parse_questions, split_paragraphs)
from megatron_solopo.data.tokenizers import user_text
from megatron_solopo.generation import SamplingParams

CHUNK_JOIN = "\n\n\n"  # the official long prompt: "\n\n\n".join(chunks)


@dataclasses.dataclass
class LongPOSettings:
    """The recipe's knobs (defaults: the official code's, scaled by the flags)."""

    min_doc_tokens: int = 0
    """Documents with fewer tokens are dropped (paper: 64K)."""
    max_doc_tokens: Optional[int] = None
    """Documents with more tokens are dropped (paper: the target length, e.g. 128K)."""
    chunk_min_tokens: int = 16384
    """Smallest chunk kept (official: 16,384)."""
    chunk_max_tokens: int = 30000
    """Largest chunk (official: 30,000)."""
    min_chunks: int = 2
    """Documents with fewer kept chunks are dropped (with one, short and long are the same)."""
    split_rule: str = "auto"
    """Paragraph rule: auto, blank-lines, latex-sections, regex:PATTERN."""
    num_questions: int = 4
    """Questions asked per chunk; an answer must parse to exactly this many (official: 4)."""
    max_turns: int = 2
    """Questions kept per document, each a turn of its record (official: 2)."""
    question_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9,
                                                       max_new_tokens=1024)
    """Sampling for the questions (official: 0.7 / 0.9 / 1,024)."""
    answer_sampling: SamplingParams = SamplingParams(temperature=1.0, top_p=1.0,
                                                     max_new_tokens=1024)
    """Sampling for chosen and rejected answers (official code: 1.0 / 1.0 / 1,024; the paper
    says greedy: temperature 0)."""
    max_repetition_chosen: float = 0.9
    """Chosen answers with a higher repeated-word ratio are dropped (official: 0.9)."""
    max_repetition_rejected: float = 0.95
    """Rejected answers with a higher repeated-word ratio are dropped (official: 0.95)."""
    seed: int = 0
    """Every random choice (question, phrase, kept turns) derives from it and the document id."""


class LongPOPipeline(Pipeline):
    name = "longpo"

    def __init__(self, inputs: list, settings: LongPOSettings, templates: Templates,
                 text_field: str = "text", id_field: str = "id", long_generator_factory=None,
                 long_generation: Optional[dict] = None):
        """``long_generator_factory`` builds the generator of the rejected (whole-document)
        answers when they need other model settings (LongPO's raised RoPE theta), described by
        ``long_generation``; default: the run's generator answers every stage."""
        if settings.chunk_min_tokens > settings.chunk_max_tokens:
            raise ValueError(f"--chunk-min-tokens {settings.chunk_min_tokens} > --chunk-max-tokens "
                             f"{settings.chunk_max_tokens}")
        if settings.max_doc_tokens is not None and settings.min_doc_tokens > settings.max_doc_tokens:
            raise ValueError(f"--min-doc-tokens {settings.min_doc_tokens} > --max-doc-tokens "
                             f"{settings.max_doc_tokens}")
        for flag, value in (("--num-questions", settings.num_questions),
                            ("--max-turns", settings.max_turns), ("--min-chunks", settings.min_chunks)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        split_paragraphs("", settings.split_rule)  # a bad rule fails now, not mid-run
        self.config = settings
        self.templates = templates
        self.phrases = templates.lines("longpo_reference_phrases.txt")
        if not self.phrases:
            raise ValueError("longpo_reference_phrases.txt has no phrase")
        templates.fill("longpo_questions.txt", context="", num_questions=1)
        refusals = templates.lines("refusal_phrases.txt")
        self.chosen_filter = AnswerFilter(refusals, settings.max_repetition_chosen)
        self.rejected_filter = AnswerFilter(refusals, settings.max_repetition_rejected)
        self.inputs = InputFiles(inputs, document_parser(text_field, id_field))
        self.inputs.check()
        self.text_field, self.id_field = text_field, id_field
        self.long_generator_factory = long_generator_factory
        self.long_generation = long_generation or {}
        self._long_generator = None

    def settings(self) -> dict:
        config = dataclasses.asdict(self.config)
        return {"pipeline": self.name, "inputs": self.inputs.fingerprints, "recipe": config,
                "text_field": self.text_field, "id_field": self.id_field,
                "templates": self.templates.describe(), "long_generation": self.long_generation}

    def _long_backend(self):
        if self.long_generator_factory is None:
            return None
        if self._long_generator is None:
            self._long_generator = self.long_generator_factory()
        return self._long_generator

    def items(self):
        return self.inputs.items()

    # ------------------------------------------------------------------------------------------
    def process(self, block: list, generator: CountingGenerator, stats: Stats) -> list:
        config = self.config
        docs = []  # per kept document: dict(index, id, chunks, long_context)
        for index, doc_id, text in block:
            num_tokens = generator.count_tokens(text)
            if num_tokens < config.min_doc_tokens:
                stats.dropped["doc_too_short"] += 1
                continue
            if config.max_doc_tokens is not None and num_tokens > config.max_doc_tokens:
                stats.dropped["doc_too_long"] += 1
                continue
            chunks, out_of_range = group_chunks(split_paragraphs(text, config.split_rule),
                                                generator.count_tokens, config.chunk_min_tokens,
                                                config.chunk_max_tokens)
            stats.sums["chunks_out_of_range"] += out_of_range
            if len(chunks) < config.min_chunks:
                stats.dropped["too_few_chunks"] += 1
                continue
            docs.append(dict(index=index, id=doc_id, chunks=chunks,
                             long_context=CHUNK_JOIN.join(chunks)))

        # Questions, one request per chunk.
        asks = [(d, c) for d in docs for c in range(len(d["chunks"]))]
        completions = generator.generate([request(
            self.templates.fill("longpo_questions.txt", context=d["chunks"][c],
                                num_questions=config.num_questions),
            config.question_sampling, f"{d['id']}/chunk{c}/questions") for d, c in asks],
            desc="questions")
        candidates = []  # (doc, chunk index, prompt)
        for (doc, c), completion in zip(asks, completions):
            questions = parse_questions(completion.texts[0], config.num_questions)
            if len(questions) != config.num_questions:
                stats.dropped["questions_unparsed"] += 1
                continue
            rng = random.Random(f"{config.seed}:{doc['id']}:{c}:question")
            prompt = f"{rng.choice(self.phrases)} {rng.choice(questions)}"
            candidates.append((doc, c, prompt))

        # Chosen: the answer from the chunk alone.
        completions = generator.generate([request(
            user_text(doc["chunks"][c], prompt), config.answer_sampling,
            f"{doc['id']}/chunk{c}/chosen") for doc, c, prompt in candidates], desc="chosen")
        by_doc: dict = {}
        for (doc, c, prompt), completion in zip(candidates, completions):
            chosen = completion.texts[0]
            reason = self.chosen_filter.reason(chosen)
            if reason:
                stats.dropped[f"chosen_{reason}"] += 1
                continue
            by_doc.setdefault(doc["id"], []).append((c, prompt, chosen))

        # Keep up to max_turns per document, then the rejected answers from the whole document.
        turns = []  # (doc, chunk index, prompt, chosen)
        for doc in docs:
            kept = by_doc.get(doc["id"], [])
            if len(kept) > config.max_turns:
                rng = random.Random(f"{config.seed}:{doc['id']}:turns")
                kept = sorted(rng.sample(kept, config.max_turns))
            stats.sums["questions_over_max_turns"] += len(by_doc.get(doc["id"], [])) - len(kept)
            turns += [(doc, c, prompt, chosen) for c, prompt, chosen in kept]
        completions = generator.generate([request(
            user_text(doc["long_context"], prompt), config.answer_sampling,
            f"{doc['id']}/chunk{c}/rejected") for doc, c, prompt, _ in turns], desc="rejected",
            backend=self._long_backend())
        kept_turns: dict = {}
        for (doc, c, prompt, chosen), completion in zip(turns, completions):
            rejected = completion.texts[0]
            reason = self.rejected_filter.reason(rejected)
            if reason is None and rejected.strip() == chosen.strip():
                reason = "identical"
            if reason:
                stats.dropped[reason if reason == "identical" else f"rejected_{reason}"] += 1
                continue
            kept_turns.setdefault(doc["id"], []).append(dict(
                prompt=prompt, short_context=doc["chunks"][c], chosen=chosen, rejected=rejected,
                chunk=c))

        records = []
        for doc in docs:
            doc_turns = kept_turns.get(doc["id"])
            if not doc_turns:
                stats.dropped["no_turn_left"] += 1
                continue
            records.append((doc["index"], self._record(doc, doc_turns)))
            stats.sums["turns"] += len(doc_turns)
        return records

    @staticmethod
    def _record(doc: dict, turns: list) -> dict:
        starts, position = [], 0
        for chunk in doc["chunks"]:
            starts.append(position)
            position += len(chunk) + len(CHUNK_JOIN)
        spans = [[starts[t["chunk"]], starts[t["chunk"]] + len(t["short_context"])] for t in turns]
        assert all(doc["long_context"][s:e] == t["short_context"]
                   for (s, e), t in zip(spans, turns))
        return {
            "id": doc["id"],
            "long_context": doc["long_context"],
            "turns": [{k: t[k] for k in ("prompt", "short_context", "chosen", "rejected")}
                      for t in turns],
            "evidence_spans": spans,
            "meta": {"source": "longpo", "chunks": len(doc["chunks"]),
                     "turn_chunks": [t["chunk"] for t in turns]},
        }

    def describe(self, stats: Stats) -> dict:
        return {"turns_per_record": round(stats.sums["turns"] / max(stats.records, 1), 3),
                "chunks_out_of_range": stats.sums["chunks_out_of_range"]}
