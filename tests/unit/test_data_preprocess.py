"""Preprocessing to the on-disk format and back: exact round trip, sidecar, atomic outputs,
workers parity, compatibility checks, the CLI."""

import json
import os

import numpy as np
import pytest

from megatron_solopo.data import preprocess as preprocess_module
from megatron_solopo.data import synthetic
from megatron_solopo.data.dataset import DATA_SUFFIXES, PreferenceDataset
from megatron_solopo.data.encoding import LengthLimits, encode_record
from megatron_solopo.data.preprocess import preprocess
from megatron_solopo.data.schema import parse_record
from megatron_solopo.data.tokenizers import build_tokenizer
from megatron_solopo.roles import ALL_ROLES, Role
from tests.unit.data_fixtures import (HF, SP, multi_turn_record, outputs, record,  # noqa: F401
                                      tokenizers, write_lines)

DATASET_FILES = sorted(["ds" + suffix for suffix in DATA_SUFFIXES] + ["ds.json"])


def expected_sequences(tokenizer, raw: dict, roles=ALL_ROLES) -> dict:
    """{role: [(tokens, mask)]} computed directly from the record (independent of the files)."""
    parsed, errors = parse_record(json.dumps(raw).encode(), "f", 1)
    assert not errors
    out: dict = {}
    for sequence in encode_record(tokenizer, parsed, roles, LengthLimits()).sequences:
        out.setdefault(sequence.role, []).append((sequence.tokens, sequence.response_mask()))
    return out


@pytest.mark.parametrize("kind", [SP, HF])
def test_round_trip_reproduces_token_ids_and_masks(tmp_path, tokenizers, kind):
    records = synthetic.generate_records("multidoc_qa", 10, seed=3, long_length=80)
    records[4]["long_context"] = None  # a short-only record
    del records[6]["short_context"]  # a long-only record
    records += [multi_turn_record(0, 3), record(99, prompt=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is item 99?"}])]
    path = write_lines(tmp_path / "in.jsonl", records)
    preprocess([path], str(tmp_path / "ds"), kind, tokenizers[kind])
    assert outputs(tmp_path / "ds") == DATASET_FILES
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    assert len(dataset) == 12 and dataset.record_ids[-2:] == ["m0", "r99"]
    assert dataset.metadata["roles"] == {"short/chosen": 11, "short/rejected": 11,
                                         "long/chosen": 11, "long/rejected": 11}
    assert dataset.metadata["sequences"]["short/chosen"] == 13  # 3 turns in m0
    assert dataset.roles == []  # no role is in every record
    for index, raw in enumerate(records):
        expected = expected_sequences(tokenizer, raw)
        group = dataset.get_group(index, list(expected))
        assert group.index == index and group.record_id == dataset.record_id(index) == str(raw["id"])
        for role, sequences in expected.items():
            got = group.sequences[role]
            assert [t.tolist() for t, _ in got] == [t for t, _ in sequences]
            assert [m.tolist() for _, m in got] == [m for _, m in sequences]
            assert all(t.dtype == np.int32 and m.dtype == bool for t, m in got)
            assert all(t[-1] == tokenizer.eos_id for t, _ in got)  # EOS closes every response
    with pytest.raises(ValueError, match="record 'mdqa-4' has no long/chosen sequence"):
        dataset.get_group(4, [Role.LONG_CHOSEN])
    with pytest.raises(ValueError, match=r"1 record\(s\) lack long/chosen"):
        dataset.check_roles([Role.SHORT_CHOSEN, Role.LONG_CHOSEN])


def test_sidecar_describes_the_dataset(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1, long_context=None),
                                               multi_turn_record(2, 2)])
    summary = preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP])
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    meta = dataset.metadata
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    assert meta["format"] == "megatron-solopo-preference" and meta["version"] == 2
    assert meta["tokenizer"] == tokenizer.describe()
    assert (meta["vocab_size"], meta["pad_id"], meta["eos_id"], meta["token_dtype"]) == \
        (tokenizer.vocab_size, 0, 2, "uint16")
    assert meta["num_records"] == 3 and meta["num_multi_turn_records"] == 1
    assert meta["roles"] == {"short/chosen": 3, "short/rejected": 3, "long/chosen": 2,
                             "long/rejected": 2}
    assert meta["num_sequences"] == summary.num_sequences == 12
    assert meta["num_tokens"] == summary.num_tokens == int(dataset.tokens.sequence_lengths.sum())
    assert sum(meta["length_histogram"]["short"].values()) == 8
    assert sum(meta["length_histogram"]["long"].values()) == 4
    assert meta["sources"][0]["path"] == os.path.abspath(path) and len(meta["source_hash"]) == 64
    assert meta["dropped"] == {"overlong": 0, "no_requested_role": 0} and meta["rejected"] == 0
    assert dataset.roles == [Role.SHORT_CHOSEN, Role.SHORT_REJECTED]


def test_summary_counts_truncated_and_dropped(tmp_path, tokenizers):
    long_text = " ".join(f"fact {i} is red." for i in range(200))
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1, long_context=long_text)])
    summary = preprocess([path], str(tmp_path / "a"), SP, tokenizers[SP], max_long_length=300,
                         overlong="drop")
    assert (summary.records_written, summary.records_dropped) == (1, 1)
    summary = preprocess([path], str(tmp_path / "b"), SP, tokenizers[SP], max_long_length=300)
    assert summary.records_written == 2 and summary.records_truncated == {"short": 0, "long": 1}
    dataset = PreferenceDataset(str(tmp_path / "b"))
    assert dataset.metadata["max_length"]["long"] <= 300 and dataset.metadata["truncated"]["long"] == 1
    assert "tokens/s" in str(summary) and "dropped 0 (overlong)" in str(summary)
    with pytest.raises(ValueError, match="every record was dropped"):
        preprocess([path], str(tmp_path / "c"), SP, tokenizers[SP], max_long_length=10,
                   max_short_length=10, overlong="drop")
    assert outputs(tmp_path / "c") == []


def test_roles_subset_is_stored(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1, long_context=None)])
    summary = preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP],
                         roles=[Role.LONG_CHOSEN, Role.LONG_REJECTED])
    assert (summary.records_written, summary.records_without_roles) == (1, 1)
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    assert dataset.roles == [Role.LONG_CHOSEN, Role.LONG_REJECTED] and dataset.record_ids == ["r0"]


def test_two_workers_write_byte_identical_output(tmp_path, tokenizers):
    records = synthetic.generate_records("kv_retrieval", 150, seed=5, long_length=60)
    path = write_lines(tmp_path / "in.jsonl", records)
    preprocess([path], str(tmp_path / "one" / "ds"), SP, tokenizers[SP], workers=1)
    preprocess([path], str(tmp_path / "two" / "ds"), SP, tokenizers[SP], workers=2)
    for name in DATASET_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_failure_midway_leaves_nothing_behind(tmp_path, tokenizers, monkeypatch):
    path = write_lines(tmp_path / "in.jsonl", [record(i) for i in range(200)])
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 150:
            raise RuntimeError("disk on fire")
        return encode_record(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "encode_record", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP], workers=1)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_overwriting_a_dataset_and_refusing_mixed_files(tmp_path, tokenizers):
    first = write_lines(tmp_path / "a.jsonl", [record(0)])
    second = write_lines(tmp_path / "b.jsonl", [record(1), record(2)])
    preprocess([first], str(tmp_path / "ds"), SP, tokenizers[SP])
    preprocess([second], str(tmp_path / "ds"), SP, tokenizers[SP])
    assert PreferenceDataset(str(tmp_path / "ds")).record_ids == ["r1", "r2"]
    assert outputs(tmp_path / "ds") == DATASET_FILES
    with open(tmp_path / "ds.bin", "ab") as handle:  # e.g. a .bin from another run
        handle.write(b"\0\0")
    with pytest.raises(ValueError, match=r"ds.bin is missing or is not the file this sidecar describes"):
        PreferenceDataset(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="ds2.json not found"):
        PreferenceDataset(str(tmp_path / "ds2"))


def test_dataset_refuses_another_tokenizer_or_a_smaller_vocab(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0)])
    preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP])
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    vocab = dataset.metadata["vocab_size"]
    dataset.check_compatible(tokenizers[SP], vocab)
    dataset.check_compatible(None, vocab + 56)  # an HF-style vocab rounded up is fine
    copy = tmp_path / "copy" / "renamed.model"
    copy.parent.mkdir()
    copy.write_bytes(open(tokenizers[SP], "rb").read())
    dataset.check_compatible(str(copy), vocab)  # identity is the files' content, not their place
    other = synthetic.train_sentencepiece_tokenizer(str(tmp_path / "other"), 180)
    with pytest.raises(ValueError, match="was tokenized with SentencePieceTokenizer:tokenizer.model "
                                         r"\(fingerprint [0-9a-f]{16}\), not with the run's tokenizer"):
        dataset.check_compatible(other, vocab)
    with pytest.raises(ValueError, match=f"vocabulary of {vocab} tokens .* the model embeds only {vocab - 1}"):
        dataset.check_compatible(None, vocab - 1)
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    dataset.check_tokenizer(tokenizer.fingerprint(), vocab)
    dataset.check_tokenizer(tokenizer.name, vocab)
    with pytest.raises(ValueError, match="not with"):
        dataset.check_tokenizer(build_tokenizer(SP, other).fingerprint(), vocab)
    with pytest.raises(ValueError, match=f"tokenizer vocabulary {vocab} in the sidecar, 5 given"):
        dataset.check_tokenizer(tokenizer.fingerprint(), 5)


def test_preprocess_tool_shows_progress_and_reports_throughput(tmp_path, tokenizers, capsys):
    import tools.preprocess_data as tool

    path = write_lines(tmp_path / "in.jsonl", synthetic.generate_records("kv_retrieval", 5, seed=1))
    assert tool.main(["--input", path, "--output-prefix", str(tmp_path / "ds"), "--tokenizer-type",
                      SP, "--tokenizer-model", tokenizers[SP], "--log-interval", "2"]) == 0
    captured = capsys.readouterr()
    assert "done: records read 5, written 5" in captured.out and "tokens/s" in captured.out
    assert "tokenizing" in captured.err and "[preprocess] 5/5 records" in captured.err
    assert tool.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix",
                      str(tmp_path / "x"), "--tokenizer-type", SP, "--tokenizer-model",
                      tokenizers[SP], "--no-progress"]) == 2
    assert "error: --input" in capsys.readouterr().err
    assert tool.main(["--input", path, "--output-prefix", str(tmp_path / "y"), "--tokenizer-type",
                      SP, "--tokenizer-model", tokenizers[SP], "--roles", "short/wrong"]) == 2
    assert "unknown role 'short/wrong'" in capsys.readouterr().err
