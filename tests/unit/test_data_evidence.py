"""Evidence spans (docs/data.md): validated by the schema, kept verbatim when truncate-middle or
truncate-left cuts the long context, the record dropped and counted when they alone do not fit."""

import json

import pytest

from megatron_solopo.data.encoding import LengthLimits, encode_record
from megatron_solopo.data.preprocess import preprocess
from megatron_solopo.data.schema import parse_record
from megatron_solopo.data.tokenizers import build_tokenizer
from megatron_solopo.roles import Role
from tests.unit.data_fixtures import HF, SP, tokenizers, write_lines  # noqa: F401

EVIDENCE = "The key of the red garden is 4711."


def evidence_record(position: str = "middle", **overrides) -> dict:
    filler = " ".join(f"filler sentence number {i}." for i in range(40))
    before, after = {"middle": (filler, filler), "start": ("", filler + " " + filler),
                     "end": (filler + " " + filler, "")}[position]
    long_context = f"{before} {EVIDENCE} {after}".strip()
    start = long_context.index(EVIDENCE)
    data = {"id": "e1", "prompt": "What is the key of the red garden?", "short_context": EVIDENCE,
            "long_context": long_context, "chosen": "It is 4711.", "rejected": "I do not know.",
            "evidence_spans": [[start, start + len(EVIDENCE)]]}
    data.update(overrides)
    return data


def parse(data):
    return parse_record(json.dumps(data).encode(), "in.jsonl", 1)


def test_schema_validates_and_merges_spans():
    record, errors = parse(evidence_record(evidence_spans=[[30, 40], [0, 10], [5, 12]]))
    assert not errors and record.evidence_spans == ((0, 12), (30, 40))
    assert parse(evidence_record(evidence_spans=None))[0].evidence_spans == ()
    cases = {
        "[[5, 3]]": "evidence_spans[0]': [5, 3] is not a non-empty range",
        "[[0, 100000]]": "is not a non-empty range inside long_context",
        "[[0.5, 2]]": "should be [start, end] (integers)",
        "[1, 2]": "evidence_spans[0]': should be [start, end]",
        '"0-5"': "should be a list of [start, end]",
    }
    for spans, message in cases.items():
        _, errors = parse(evidence_record(evidence_spans=json.loads(spans)))
        assert errors and message in str(errors[0]), (spans, errors)
    _, errors = parse(evidence_record(long_context=None, evidence_spans=[[0, 1]]))
    assert "field 'evidence_spans': needs a long_context" in str(errors[0])


@pytest.mark.parametrize("kind", [SP, HF])
@pytest.mark.parametrize("position, policy", [("middle", "truncate-middle"),
                                              ("start", "truncate-left"),
                                              ("end", "truncate-middle")])
def test_truncation_keeps_evidence(tokenizers, kind, position, policy):
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    data = evidence_record(position)
    record, _ = parse(data)
    roles = [Role.LONG_CHOSEN, Role.LONG_REJECTED]
    full = encode_record(tokenizer, record, roles, LengthLimits())
    full_length = max(len(s.tokens) for s in full.sequences)
    limit = full_length // 2
    cut = encode_record(tokenizer, record, roles, LengthLimits(max_long_length=limit,
                                                               overlong=policy))
    assert cut.dropped is None and cut.truncated == ("long",)
    for sequence in cut.sequences:
        assert len(sequence.tokens) <= limit
        assert EVIDENCE in tokenizer.decode(sequence.tokens)
    # The same record without spans loses its evidence to the same cut (what the spans prevent).
    if position != "end" or policy != "truncate-middle":
        plain, _ = parse(dict(data, evidence_spans=None))
        blind = encode_record(tokenizer, plain, roles, LengthLimits(max_long_length=limit,
                                                                    overlong=policy))
        assert all(EVIDENCE not in tokenizer.decode(s.tokens) for s in blind.sequences)


def test_evidence_that_cannot_fit_drops_the_record(tokenizers, tmp_path):
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    data = evidence_record("middle")
    record, _ = parse(data)
    prompt_only = len(tokenizer.encode_prompt(None, EVIDENCE, data["prompt"]))
    encoded = encode_record(tokenizer, record, [Role.LONG_CHOSEN],
                            LengthLimits(max_long_length=prompt_only - 2))
    assert encoded.dropped.startswith("overlong") and "evidence spans" in encoded.dropped
    # through the tool: counted as dropped (overlong), the other record written
    path = write_lines(tmp_path / "in.jsonl", [data, dict(evidence_record("middle"), id="e2",
                                                         evidence_spans=None)])
    summary = preprocess([path], str(tmp_path / "out"), SP, tokenizers[SP],
                         max_long_length=prompt_only - 2, roles=[Role.LONG_CHOSEN])
    assert summary.records_written == 1 and summary.records_dropped == 1
