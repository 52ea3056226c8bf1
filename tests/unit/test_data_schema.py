"""Record schema validation: every bad-input case names file, line, record id and field, one run
reports every bad line, and nothing is written unless --skip-invalid."""

import json
from pathlib import Path

import pytest

from megatron_solopo.data.dataset import PreferenceDataset
from megatron_solopo.data.preprocess import preprocess, validate_inputs
from megatron_solopo.data.schema import parse_record
from megatron_solopo.roles import ALL_ROLES, Role
from tests.unit.data_fixtures import (SP, multi_turn_record, outputs, record,  # noqa: F401
                                      tokenizers, write_lines)


def without(data: dict, *names) -> dict:
    return {key: value for key, value in data.items() if key not in names}


# (line, field named (None: the line has no record id/field), message)
BAD_LINES = [
    (b'{"id": "x", "prompt": ', None, "invalid JSON"),
    (b'\xff\xfe{"id": 1}', None, "not valid UTF-8"),
    ([1, 2], None, "a record must be a JSON object"),
    (without(record(1), "id"), "id", "missing field"),
    (record(2, id=["a"]), "id", "should be a non-empty string"),
    (without(record(3), "prompt"), "prompt", "missing field"),
    (record(4, prompt="  "), "prompt", "is empty"),
    (without(record(5), "chosen"), "chosen", "missing field"),
    (record(6, chosen=5), "chosen", "should be a string or an assistant message, got int"),
    (record(7, chosen=""), "chosen", "empty response"),
    (record(8, rejected=" It is red. "), "rejected", "chosen and rejected are identical"),
    (record(9, short_context="x" * 500), "short_context", "is longer than long_context"),
    (record(10, long_context=7), "long_context", "should be a string (or null), got int"),
    (record(11, long_context=""), "long_context", "is empty"),
    (record(12, long_context=None, short_context=None), "long_context",
     "a record needs short_context or long_context"),
    (record(13, meta=[1]), "meta", "should be an object"),
    (record(14, system=3), "system", "should be a string"),
    (record(15, prompt=[{"role": "assistant", "content": "hi"}]), "prompt",
     "the last message must be the user's question"),
    (record(16, prompt=[{"role": "wizard", "content": "hi"}]), "prompt", "has role 'wizard'"),
    (record(17, system="a", prompt=[{"role": "system", "content": "b"},
                                    {"role": "user", "content": "q"}]), "system", "given twice"),
    (dict(multi_turn_record(18), prompt="q"), "prompt", "inside each of its 'turns'"),
    (dict(multi_turn_record(19), turns=[]), "turns", "non-empty list"),
    (dict(multi_turn_record(20), turns=[{"prompt": "q", "chosen": "a", "rejected": "a"}]),
     "turns[0].rejected", "chosen and rejected are identical"),
    (dict(multi_turn_record(21), turns=[{"chosen": "a", "rejected": "b"}]), "turns[0].prompt",
     "missing field"),
    (dict(multi_turn_record(22), turns=[
        {"prompt": "q", "chosen": "a", "rejected": "b", "short_context": "s"},
        {"prompt": "q2", "chosen": "a", "rejected": "b"}]), "turns[1].short_context",
     "missing while other turns have one"),
]


def _expected_location(path: str, line, field) -> str:
    if field is None:
        return f"{path}:1: "
    record_id = None if field == "id" else line["id"]
    where = f"{path}:1: " + (f"record {record_id!r}: " if record_id else "")
    return where + f"field {field!r}: "


@pytest.mark.parametrize("line,field,message", BAD_LINES,
                         ids=[f"{i}-{m[:24]}" for i, (_, _, m) in enumerate(BAD_LINES)])
def test_each_bad_input_names_file_line_id_field_and_writes_nothing(tmp_path, tokenizers, line,
                                                                   field, message):
    path = write_lines(tmp_path / "in.jsonl", [line])
    prefix = tmp_path / "out" / "ds"
    with pytest.raises(ValueError) as err:
        preprocess([path], str(prefix), SP, tokenizers[SP])
    text = str(err.value)
    location = _expected_location(path, line, field)
    (error_line,) = [entry for entry in text.splitlines() if location in entry]
    assert message in error_line.split(location, 1)[1], text
    assert "nothing was written" in text
    assert not prefix.parent.exists() and outputs(prefix) == []


def test_every_error_of_one_record_is_reported():
    raw = json.dumps(without(record(0, chosen="", meta=3), "prompt")).encode()
    parsed, errors = parse_record(raw, "f.jsonl", 7)
    assert parsed is None
    assert [e.field for e in errors] == ["meta", "prompt", "chosen"]
    assert all(str(e).startswith("f.jsonl:7: record 'r0': field ") for e in errors)


def test_all_bad_lines_are_reported_in_one_run(tmp_path, tokenizers):
    lines = [record(0), record(1, chosen=""), b"not json", record(3), record(3), b"", record(5)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(ValueError) as err:
        preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP])
    text = str(err.value)
    assert "3 invalid record(s)" in text
    assert f"{path}:2: record 'r1': field 'chosen': empty response" in text
    assert f"{path}:3: invalid JSON" in text
    assert f"{path}:5: record 'r3': field 'id': duplicate id (first at {path}:4)" in text
    assert outputs(tmp_path / "ds") == []


def test_duplicate_ids_across_files_and_the_error_cap(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [record(0)])
    second = write_lines(tmp_path / "b.jsonl", [record(0)] + [record(i, chosen="") for i in range(1, 30)])
    validation = validate_inputs([first, second], max_errors=5)
    assert validation.num_records == 31 and validation.num_invalid == 30
    assert len(validation.errors) == 5
    assert str(validation.errors[0]) == (f"{second}:1: record 'r0': field 'id': duplicate id "
                                         f"(first at {first}:1)")


def test_error_message_says_how_many_more(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(i, chosen="") for i in range(8)])
    with pytest.raises(ValueError, match=r"(?s)8 invalid record\(s\).*and 5 more invalid record\(s\) "
                                         r"\(raise --max-errors"):
        preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP], max_errors=3)


def test_skip_invalid_writes_rejects_and_goes_on(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1, chosen=""), b"{bad", record(3)])
    summary = preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP], skip_invalid=True,
                         rejects_file=str(tmp_path / "rejects.jsonl"))
    assert (summary.records_read, summary.records_written, summary.records_rejected) == (4, 2, 2)
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3]
    assert "field 'chosen': empty response" in rejects[0]["errors"][0]
    assert rejects[1]["raw"] == "{bad"
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    assert dataset.record_ids == ["r0", "r3"] and dataset.metadata["rejected"] == 2


def test_nothing_valid_is_an_error(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(1, chosen="")])
    with pytest.raises(ValueError, match="no valid record"):
        preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP], skip_invalid=True)
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no valid record"):
        preprocess([empty], str(tmp_path / "ds"), SP, tokenizers[SP])
    assert outputs(tmp_path / "ds") == []


def test_chat_messages_form():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Color?"}]
    raw = json.dumps(record(0, prompt=messages, chosen={"role": "assistant", "content": "Red."},
                            rejected=[{"role": "assistant", "content": "Blue."}])).encode()
    parsed, errors = parse_record(raw, "f", 1)
    assert not errors
    assert parsed.system == "Be brief." and parsed.history == messages[1:3]
    assert [(t.prompt, t.chosen, t.rejected) for t in parsed.turns] == [("Color?", "Red.", "Blue.")]
    as_messages_key = json.loads(raw)
    as_messages_key["messages"] = as_messages_key.pop("prompt")
    parsed_too, errors = parse_record(json.dumps(as_messages_key).encode(), "f", 1)
    assert not errors and parsed_too == parsed


def test_one_sided_and_multi_turn_records():
    short_only, errors = parse_record(json.dumps(record(0, long_context=None)).encode(), "f", 1)
    assert not errors and short_only.roles == [Role.SHORT_CHOSEN, Role.SHORT_REJECTED]
    long_only, errors = parse_record(json.dumps(without(record(0), "short_context")).encode(), "f", 1)
    assert not errors and long_only.roles == [Role.LONG_CHOSEN, Role.LONG_REJECTED]
    multi, errors = parse_record(json.dumps(multi_turn_record(0, 3)).encode(), "f", 1)
    assert not errors and multi.is_multi_turn and len(multi.turns) == 3
    assert multi.roles == list(ALL_ROLES) and multi.turns[2].short_context == "chunk 2 of the document"


def test_byte_order_mark_on_the_first_line_is_accepted():
    parsed, errors = parse_record(b"\xef\xbb\xbf" + json.dumps(record(0)).encode(), "f", 1)
    assert not errors and parsed.id == "r0"


def test_integer_ids_become_strings(tmp_path):
    parsed, errors = parse_record(json.dumps(record(0, id=17)).encode(), "f", 1)
    assert not errors and parsed.id == "17"


def test_missing_input_file(tmp_path, tokenizers):
    with pytest.raises(ValueError, match="--input .*missing.jsonl: file not found"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "ds"), SP, tokenizers[SP])
    assert not Path(tmp_path / "ds.json").exists()
