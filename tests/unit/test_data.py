"""Data pipeline: schema validation, tokenization, on-disk round trip, packing, sampling."""

import json
from pathlib import Path

import pytest

from megatron_solopo.data import synthetic
from megatron_solopo.data.dataset import PreferenceDataset
from megatron_solopo.data.packing import (build_micro_batches, pad_multiple_for,
                                          plan_micro_batches)
from megatron_solopo.data.preprocess import LengthLimits, preprocess, prompt_ids, tokenize_record
from megatron_solopo.data.sampler import PreferenceSampler
from megatron_solopo.data.schema import parse_record
from megatron_solopo.data.tokenizers import build_tokenizer
from megatron_solopo.roles import ALL_ROLES, Role

SP = "SentencePieceTokenizer"
HF = "HuggingFaceTokenizer"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {SP: synthetic.train_sentencepiece_tokenizer(str(root / "sp"), 200),
            HF: synthetic.make_hf_tokenizer(str(root / "hf"), 300)}


def record(index=0, **overrides):
    data = {"id": f"r{index}", "prompt": f"What is item {index}?", "short_context": "item is red",
            "long_context": "filler text. " * 20 + "item is red", "chosen": "It is red.",
            "rejected": "I do not know."}
    data.update(overrides)
    return data


def write_lines(path: Path, lines):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def outputs(prefix):
    return sorted(p.name for p in Path(prefix).parent.iterdir() if p.name.startswith(Path(prefix).name))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
BAD_LINES = [
    (b'{"id": "x", "prompt": ', "line 1", "invalid JSON"),
    (b'\xff\xfe{"id": 1}', "line 1", "not valid UTF-8"),
    (record(1, chosen=""), "record 'r1': field 'chosen'", "empty response"),
    (record(2, rejected="It is red."), "record 'r2': field 'rejected'", "chosen and rejected are identical"),
    (record(3, short_context="x" * 500), "record 'r3': field 'short_context'", "is longer than long_context"),
    (record(4, chosen=5), "record 'r4': field 'chosen'", "should be a string"),
    ({k: v for k, v in record(5).items() if k != "prompt"}, "record 'r5': field 'prompt'", "missing field"),
    ({k: v for k, v in record(6).items() if k != "id"}, "field 'id'", "missing field"),
    (record(7, long_context=None, short_context=None), "record 'r7': field 'long_context'",
     "needs short_context or long_context"),
    (record(8, meta=[1]), "record 'r8': field 'meta'", "should be an object"),
    (record(9, prompt=[{"role": "assistant", "content": "hi"}]), "record 'r9': field 'prompt'",
     "the last message must be the user's turn"),
    ([1, 2], "line 1", "must be a JSON object"),
]


@pytest.mark.parametrize("line,where,message", BAD_LINES)
def test_each_bad_input_is_named_and_nothing_is_written(tmp_path, tokenizers, line, where, message):
    path = write_lines(tmp_path / "in.jsonl", [line])
    prefix = str(tmp_path / "out" / "ds")
    with pytest.raises(ValueError) as err:
        preprocess([path], prefix, SP, tokenizers[SP])
    text = str(err.value)
    assert f"{path}:1" in text
    assert where.replace("line 1", f"{path}:1") in text
    assert message in text
    assert "nothing was written" in text
    assert not Path(prefix).parent.exists() or outputs(prefix) == []


def test_all_bad_lines_are_reported_in_one_run(tmp_path, tokenizers):
    lines = [record(0), record(1, chosen=""), b"not json", record(3), record(3)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(ValueError) as err:
        preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP])
    text = str(err.value)
    assert "3 invalid record(s)" in text
    assert f"{path}:2: record 'r1'" in text and f"{path}:3: invalid JSON" in text
    assert f"{path}:5: record 'r3': field 'id': duplicate id (first at {path}:4)" in text


def test_skip_invalid_writes_rejects_and_goes_on(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1, chosen=""), record(2)])
    summary = preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP], skip_invalid=True)
    assert (summary.records_written, summary.records_rejected) == (2, 1)
    rejects = [json.loads(l) for l in (tmp_path / "ds.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 2 and "empty response" in rejects[0]["errors"][0]
    assert PreferenceDataset(str(tmp_path / "ds")).record_ids == ["r0", "r2"]


def test_chat_messages_form(tokenizers):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Color?"}]
    parsed, errors = parse_record(json.dumps(record(0, prompt=messages, chosen={
        "role": "assistant", "content": "Red."})).encode(), "f", 1)
    assert not errors and parsed.messages == messages and parsed.chosen == "Red."
    tokenizer = build_tokenizer(HF, tokenizers[HF])
    text = tokenizer.decode(prompt_ids(tokenizer, parsed, "short"))
    assert "<|system|>" in text and "item is red\n\nColor?" in text and text.endswith("<|assistant|>\n")


# ---------------------------------------------------------------------------------------------
# Tokenization, truncation, the on-disk round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer_type", [SP, HF])
def test_round_trip_reproduces_token_ids_and_masks(tmp_path, tokenizers, tokenizer_type):
    records = synthetic.generate_records("multidoc_qa", 12, seed=3, long_length=80)
    records[5]["long_context"] = None  # a short-only record
    path = write_lines(tmp_path / "in.jsonl", records)
    preprocess([path], str(tmp_path / "ds"), tokenizer_type, tokenizers[tokenizer_type])
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    tokenizer = build_tokenizer(tokenizer_type, tokenizers[tokenizer_type])
    assert len(dataset) == 12 and dataset.metadata["roles"]["long/chosen"] == 11
    for index, raw in enumerate(records):
        parsed, _ = parse_record(json.dumps(raw).encode(), path, index + 1)
        roles = [r for r in ALL_ROLES if parsed.context(r.context)]
        group = dataset.get_group(index, roles)
        for role in roles:
            ((tokens, mask),) = group.sequences[role]
            prompt = prompt_ids(tokenizer, parsed, role.context)
            response = tokenizer.encode_response(parsed.response(role.response))
            assert tokens.tolist() == prompt + response
            assert mask.tolist() == [False] * len(prompt) + [True] * len(response)
            assert tokens[-1] == tokenizer.eos_id  # EOS closes every response
    with pytest.raises(ValueError, match="record 'mdqa-5' has no long/chosen sequence"):
        dataset.get_group(5, [Role.LONG_CHOSEN])
    with pytest.raises(ValueError, match="1 record\\(s\\) lack long/chosen"):
        dataset.check_roles([Role.SHORT_CHOSEN, Role.LONG_CHOSEN])


@pytest.mark.parametrize("policy", ["truncate-middle", "truncate-left", "drop"])
def test_overlong_policies_never_cut_the_response(tmp_path, tokenizers, policy):
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    parsed, _ = parse_record(json.dumps(record(0)).encode(), "f", 1)
    full = tokenize_record(tokenizer, parsed, ALL_ROLES, LengthLimits())
    long_lengths = [len(t) for t, r in zip(full.tokens, full.roles) if r.context == "long"]
    limit = min(long_lengths) - 10
    result = tokenize_record(tokenizer, parsed, ALL_ROLES, LengthLimits(max_long_length=limit,
                                                                        overlong=policy))
    if policy == "drop":
        assert result.dropped and "--max-long-length" in result.dropped
        return
    assert result.truncated == {"short": 0, "long": 2}
    for tokens, mask, role, original in zip(result.tokens, result.masks, result.roles, full.tokens):
        response = tokenizer.encode_response(parsed.response(role.response))
        assert tokens[-len(response):] == response and sum(mask) == len(response)
        if role.context == "long":
            assert len(tokens) == limit
            keep = limit - len(response)
            prompt = original[:len(original) - len(response)]
            if policy == "truncate-middle":
                assert tokens[:keep // 2] == prompt[:keep // 2]  # head kept
            else:
                assert tokens[0] == tokenizer.bos_id and tokens[1:keep] == prompt[-(keep - 1):]
        else:
            assert tokens == original


def test_summary_counts_truncated_and_dropped(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1, long_context="a b " * 400)])
    summary = preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP], max_long_length=300,
                         overlong="drop")
    assert (summary.records_written, summary.records_dropped) == (1, 1)
    summary = preprocess([path], str(tmp_path / "ds2"), SP, tokenizers[SP], max_long_length=300)
    assert summary.records_written == 2 and summary.sequences_truncated["long"] == 2
    assert "tokens/s" in str(summary)


def test_two_workers_write_byte_identical_output(tmp_path, tokenizers):
    records = synthetic.generate_records("kv_retrieval", 30, seed=5, long_length=60)
    path = write_lines(tmp_path / "in.jsonl", records)
    preprocess([path], str(tmp_path / "one" / "ds"), SP, tokenizers[SP], workers=1)
    preprocess([path], str(tmp_path / "two" / "ds"), SP, tokenizers[SP], workers=2)
    for suffix in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        assert (tmp_path / "one" / f"ds{suffix}").read_bytes() == \
            (tmp_path / "two" / f"ds{suffix}").read_bytes()
    one = json.loads((tmp_path / "one" / "ds.json").read_text())
    two = json.loads((tmp_path / "two" / "ds.json").read_text())
    assert one == two


def test_dataset_refuses_another_tokenizer_or_a_smaller_vocab(tmp_path, tokenizers):
    path = write_lines(tmp_path / "in.jsonl", [record(0)])
    preprocess([path], str(tmp_path / "ds"), SP, tokenizers[SP])
    dataset = PreferenceDataset(str(tmp_path / "ds"))
    dataset.check_compatible(tokenizers[SP], 200)
    dataset.check_compatible(None, 256)  # an HF-style vocab rounded up is fine
    other = synthetic.train_sentencepiece_tokenizer(str(tmp_path / "other"), 180)
    with pytest.raises(ValueError, match="not with the run's tokenizer"):
        dataset.check_compatible(other, 200)
    with pytest.raises(ValueError, match="the model embeds only 150"):
        dataset.check_compatible(None, 150)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizers):
    root = tmp_path_factory.mktemp("ds")
    records = synthetic.generate_records("kv_retrieval", 24, seed=9, long_length=50)
    path = write_lines(root / "in.jsonl", records)
    preprocess([path], str(root / "ds"), SP, tokenizers[SP])
    return PreferenceDataset(str(root / "ds"))


@pytest.mark.parametrize("cp,tp,sp", [(1, 1, False), (2, 1, False), (4, 2, True)])
def test_packs_hold_whole_groups_padded_for_context_parallelism(dataset, cp, tp, sp):
    roles = [Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN]
    pad = pad_multiple_for(cp, tp, sp)
    batches = build_micro_batches(dataset, list(range(12)), roles, token_budget=900,
                                  pad_multiple=pad, pad_token_id=dataset.metadata["pad_id"])
    assert len(batches) > 1
    seen = []
    for batch in batches:
        batch.validate(pad)
        assert batch.num_tokens <= 900
        for g, sample in enumerate(batch.sample_indices.tolist()):
            in_group = (batch.group_index == g).nonzero()[:, 0]
            assert [Role.from_index(int(batch.roles[i])) for i in in_group] == roles  # whole group
            group = dataset.get_group(sample, roles)
            for i, role in zip(in_group.tolist(), roles):
                start, length = int(batch.cu_seqlens[i]), int(batch.seq_lengths[i])
                tokens, mask = group.sequences[role][0]
                assert batch.tokens[start:start + length].tolist() == tokens.tolist()
                assert batch.labels[start:start + length - 1].tolist() == tokens[1:].tolist()
                assert batch.loss_mask[start:start + length - 1].tolist() == mask[1:].astype(float).tolist()
                end = int(batch.cu_seqlens[i + 1])
                assert batch.loss_mask[start + length - 1:end].sum() == 0  # no target past the end
                assert batch.position_ids[start:end].tolist() == list(range(end - start))
            seen.append(sample)
    assert seen == list(range(12))


def test_group_over_budget_is_named():
    with pytest.raises(ValueError, match="record 'big' needs 1200 tokens .* budget data.max_tokens_per_micro_batch=1000"):
        plan_micro_batches([300, 1200], 1000, ["small", "big"])
    assert plan_micro_batches([300, 400, 400, 100], 800) == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def take(sampler, steps):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(steps)]


def test_sampler_shards_over_data_parallel_ranks():
    ranks = [take(PreferenceSampler(50, 8, r, 4, seed=1), 12) for r in range(4)]
    for step in range(12):
        union = sum((ranks[r][step] for r in range(4)), [])
        assert len(union) == len(set(union)) == 8
    epoch0 = sum((sum((ranks[r][s] for r in range(4)), []) for s in range(6)), [])
    assert len(set(epoch0)) == 48  # 6 full global batches in epoch 0, the last 2 records dropped


def test_resume_yields_exactly_the_remaining_order_across_epochs():
    full = take(PreferenceSampler(50, 8, 1, 2, seed=3), 20)
    for consumed_steps in (0, 5, 6, 13):
        resumed = take(PreferenceSampler(50, 8, 1, 2, seed=3, consumed_samples=8 * consumed_steps),
                       20 - consumed_steps)
        assert resumed == full[consumed_steps:]
    assert take(PreferenceSampler(50, 8, 1, 2, seed=3), 7)[6] != full[0]  # epoch 1 reshuffled
    assert take(PreferenceSampler(16, 8, 0, 1, seed=0, shuffle=False), 3) == \
        [list(range(8)), list(range(8, 16)), list(range(8))]


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_samples=50, global_batch_size=6, data_parallel_size=4), "not divisible by the data-parallel size 4"),
    (dict(num_samples=5, global_batch_size=8, data_parallel_size=1), "fewer than one global batch"),
])
def test_sampler_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceSampler(kwargs["num_samples"], kwargs["global_batch_size"], 0,
                          kwargs["data_parallel_size"], seed=0)


def test_preprocess_tool_reports_throughput(tmp_path, tokenizers, capsys):
    import tools.preprocess_data as tool

    path = write_lines(tmp_path / "in.jsonl", synthetic.generate_records("kv_retrieval", 5, seed=1))
    assert tool.main(["--input", path, "--output-prefix", str(tmp_path / "ds"), "--tokenizer-type",
                      SP, "--tokenizer-model", tokenizers[SP], "--no-progress"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert tool.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix",
                      str(tmp_path / "x"), "--tokenizer-type", SP, "--tokenizer-model",
                      tokenizers[SP]]) == 2
    assert "--input" in capsys.readouterr().err
