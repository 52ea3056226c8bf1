"""Synthetic long-context tasks and the tiny tokenizers."""

import json
import re
import time

import pytest

from megatron_solopo.data import synthetic
from megatron_solopo.data.schema import parse_record
from megatron_solopo.data.tokenizers import build_tokenizer
from tests.unit.data_fixtures import HF, SP, tokenizers  # noqa: F401


@pytest.mark.parametrize("task", synthetic.TASKS)
@pytest.mark.parametrize("num_turns", [1, 3])
def test_records_are_valid_deterministic_and_answerable(task, num_turns):
    records = synthetic.generate_records(task, 30, seed=4, long_length=300, num_turns=num_turns)
    assert records == synthetic.generate_records(task, 30, seed=4, long_length=300,
                                                 num_turns=num_turns)
    assert records != synthetic.generate_records(task, 30, seed=5, long_length=300,
                                                 num_turns=num_turns)
    assert len({r["id"] for r in records}) == 30
    for line, raw in enumerate(records, start=1):
        parsed, errors = parse_record(json.dumps(raw).encode(), "f", line)
        assert not errors, errors
        assert len(parsed.turns) == num_turns
        answers = raw["meta"]["answers"] if num_turns > 1 else [raw["meta"]["answer"]]
        for turn, answer in zip(parsed.turns, answers):
            assert answer in turn.chosen and answer not in turn.rejected
            assert answer in turn.short_context and answer in parsed.long_context
            # the short context's lines (the evidence) are all in the long context
            assert all(piece in parsed.long_context for piece in turn.short_context.split("\n")
                       if task != "needle") or turn.short_context in parsed.long_context
        words = len(parsed.long_context.split())
        assert 300 <= words <= 340


def test_long_contexts_never_contradict_the_answer():
    for raw in synthetic.generate_records("multidoc_qa", 20, seed=1, long_length=3000):
        person = re.match(r"(\w+) (was born in|worked as a)", raw["chosen"]).group(1)
        assert raw["long_context"].count(f"Document: {person} was born") == 1
    for raw in synthetic.generate_records("kv_retrieval", 5, seed=1, long_length=16000):
        keys = re.findall(r"key (\w+) has value", raw["long_context"])
        assert len(keys) == len(set(keys)) > 3000  # every key once, even past the 2-syllable space
    for raw in synthetic.generate_records("needle", 5, seed=1, long_length=3000):
        assert raw["long_context"].count("secret number") == 3


def test_kv_rejected_answers_always_differ_from_chosen():
    for seed in (1234, 1235):
        assert all(r["chosen"] != r["rejected"]
                   for r in synthetic.generate_records("kv_retrieval", 2000, seed=seed, long_length=30))


def test_words_for_tokens_calibrates_the_length(tokenizers):
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    words = synthetic.words_for_tokens("multidoc_qa", 4000, tokenizer)
    records = synthetic.generate_records("multidoc_qa", 3, seed=2, long_length=words)
    for raw in records:
        assert 3600 <= len(tokenizer.encode_text(raw["long_context"])) <= 4400


def test_make_synthetic_data_tool(tmp_path, capsys):
    import tools.make_synthetic_data as tool

    out = tmp_path / "kv.jsonl"
    assert tool.main(["--task", "kv_retrieval", "--num-records", "4", "--long-length", "500",
                      "--length-unit", "tokens", "--tokenizer-dir", str(tmp_path / "tok"),
                      "--num-turns", "2", "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["turns"]) == 2
    assert (tmp_path / "tok" / "tokenizer.model").exists()
    with pytest.raises(SystemExit):  # argparse: not one of the tasks
        tool.main(["--task", "nope", "--num-records", "1", "--output", str(out)])
    capsys.readouterr()
    assert tool.main(["--task", "needle", "--num-records", "1", "--length-unit", "tokens",
                      "--output", str(out)]) == 2
    assert "--length-unit tokens needs --tokenizer-model" in capsys.readouterr().err


def test_tiny_tokenizers_are_fast_and_load_offline(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    model = synthetic.train_sentencepiece_tokenizer(str(tmp_path / "sp"), vocab_size=256)
    directory = synthetic.make_hf_tokenizer(str(tmp_path / "hf"), vocab_size=300)
    assert time.perf_counter() - start < 10
    loaded = AutoTokenizer.from_pretrained(directory)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.chat_template == synthetic.CHAT_TEMPLATE
    text = loaded.apply_chat_template([{"role": "user", "content": "Where was Kalomi born?"}],
                                      tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nWhere was Kalomi born?\n<|assistant|>\n"
    sp = build_tokenizer(SP, model)
    record = synthetic.generate_records("needle", 1, seed=0, long_length=200)[0]
    assert 3 not in sp.encode_text(record["long_context"] + " " + record["chosen"])  # no <unk>
