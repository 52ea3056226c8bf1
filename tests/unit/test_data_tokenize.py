"""Tokenizers, templates, EOS, multi-turn masks and the over-long policies."""

import json

import pytest

from megatron_solopo.data.encoding import LengthLimits, encode_record
from megatron_solopo.data.schema import parse_record
from megatron_solopo.data.tokenizers import build_tokenizer
from megatron_solopo.roles import ALL_ROLES, Role
from tests.unit.data_fixtures import HF, SP, multi_turn_record, record, tokenizers  # noqa: F401


def parsed(data: dict):
    result, errors = parse_record(json.dumps(data).encode(), "f.jsonl", 1)
    assert not errors, errors
    return result


def by_role(encoded) -> dict:
    out: dict = {}
    for sequence in encoded.sequences:
        out.setdefault(sequence.role, []).append(sequence)
    return out


def test_unknown_tokenizer_type_lists_the_valid_ones(tokenizers):
    with pytest.raises(ValueError, match="'GPT2BPETokenizer' is not supported; valid: "
                                         "HuggingFaceTokenizer, SentencePieceTokenizer"):
        build_tokenizer("GPT2BPETokenizer", tokenizers[SP])
    with pytest.raises(ValueError, match="no SentencePiece model file"):
        build_tokenizer(SP, "/nonexistent/tokenizer.model")
    with pytest.raises(ValueError, match="not a directory with Hugging Face tokenizer files"):
        build_tokenizer(HF, "/nonexistent")


@pytest.mark.parametrize("kind", [SP, HF])
def test_tokenizer_interface(tokenizers, kind):
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    assert tokenizer.name == f"{kind}:{'tokenizer.model' if kind == SP else 'hf'}"
    assert len(tokenizer.fingerprint()) == 64
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (2, 0, 1)
    assert tokenizer.template == ("plain" if kind == SP else "chat")
    response = tokenizer.encode_response("It is red.")
    assert response[-1] == tokenizer.eos_id and response.count(tokenizer.eos_id) == 1
    assert tokenizer.decode(response[:-1]).strip() == "It is red."
    if kind == HF:  # EOS exactly once, even when the text already ends with the EOS token
        assert tokenizer.encode_response("It is red." + tokenizer.eos_text) == response
    copy = build_tokenizer(kind, tokenizers[kind])
    assert copy.fingerprint() == tokenizer.fingerprint()


def test_hf_prompt_is_the_chat_template_with_generation_prompt(tokenizers):
    tokenizer = build_tokenizer(HF, tokenizers[HF])
    ids = tokenizer.encode_prompt("Be brief.", "item is red", "Color?")
    expected = tokenizer.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "item is red\n\nColor?"}], tokenize=True,
        add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert tokenizer.decode(ids) == ("<s><|system|>\nBe brief.\n<|user|>\nitem is red\n\nColor?\n"
                                     "<|assistant|>\n")


def test_sentencepiece_plain_template(tokenizers):
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    ids = tokenizer.encode_prompt("Be brief.", "item is red", "Color?")
    assert ids[0] == tokenizer.bos_id
    assert ids[1:] == tokenizer.encode_text("Be brief.\n\nitem is red\n\nColor?\n")
    assert tokenizer.encode_prompt(None, None, "Color?")[1:] == tokenizer.encode_text("Color?\n")


@pytest.mark.parametrize("kind", [SP, HF])
def test_single_turn_sequences_are_prompt_plus_response(tokenizers, kind):
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    data = record(0, system="Be brief.")
    encoded = encode_record(tokenizer, parsed(data), ALL_ROLES, LengthLimits())
    assert [s.role for s in encoded.sequences] == list(ALL_ROLES)
    for sequence in encoded.sequences:
        context = data[f"{sequence.role.context}_context"]
        prompt = tokenizer.encode_prompt("Be brief.", context, data["prompt"])
        response = tokenizer.encode_response(data[sequence.role.response])
        assert sequence.tokens == prompt + response
        assert sequence.spans == [(len(prompt), len(prompt) + len(response))]
        assert sequence.response_mask() == [False] * len(prompt) + [True] * len(response)


@pytest.mark.parametrize("kind", [SP, HF])
def test_chat_history_and_context_placement(tokenizers, kind):
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Color?"}]
    data = record(0, prompt=messages)
    encoded = encode_record(tokenizer, parsed(data), [Role.SHORT_CHOSEN], LengthLimits())
    (sequence,) = encoded.sequences
    with_context = messages[:2] + [{"role": "user", "content": "item is red\n\nColor?"}]
    prompt = tokenizer.encode_messages(with_context)
    assert sequence.tokens[:len(prompt)] == prompt
    if kind == HF:
        assert tokenizer.decode(prompt) == ("<s><|user|>\nHi\n<|assistant|>\nHello.</s>\n<|user|>\n"
                                            "item is red\n\nColor?\n<|assistant|>\n")


@pytest.mark.parametrize("kind", [SP, HF])
def test_multi_turn_long_sequence_masks_every_answer(tokenizers, kind):
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    data = multi_turn_record(0, num_turns=3)
    encoded = by_role(encode_record(tokenizer, parsed(data), ALL_ROLES, LengthLimits()))
    assert {role: len(seqs) for role, seqs in encoded.items()} == {
        Role.SHORT_CHOSEN: 3, Role.SHORT_REJECTED: 3, Role.LONG_CHOSEN: 1, Role.LONG_REJECTED: 1}
    for kind_name, role in (("chosen", Role.LONG_CHOSEN), ("rejected", Role.LONG_REJECTED)):
        (sequence,) = encoded[role]
        answers = [tokenizer.decode(sequence.tokens[a:b]) for a, b in sequence.spans]
        assert [a.replace("</s>", "").strip() for a in answers] == \
            [turn[kind_name] for turn in data["turns"]]
        assert all(sequence.tokens[b - 1] == tokenizer.eos_id for _, b in sequence.spans)
        assert sum(sequence.response_mask()) == sum(b - a for a, b in sequence.spans)
        text = tokenizer.decode(sequence.tokens)
        assert "the long document." in text and text.count("Question") == 3
    for turn, sequence in enumerate(encoded[Role.SHORT_CHOSEN]):
        prompt = tokenizer.encode_prompt("Be brief.", f"chunk {turn} of the document", f"Question {turn}?")
        assert sequence.tokens == prompt + tokenizer.encode_response(f"Answer {turn}.")


def test_multi_turn_chat_turns_follow_the_template(tokenizers):
    tokenizer = build_tokenizer(HF, tokenizers[HF])
    encoded = encode_record(tokenizer, parsed(multi_turn_record(0, 2)), [Role.LONG_CHOSEN], LengthLimits())
    text = tokenizer.decode(encoded.sequences[0].tokens)
    rendered = tokenizer.tokenizer.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the long document. " * 30 + "\n\nQuestion 0?"},
        {"role": "assistant", "content": "Answer 0."},
        {"role": "user", "content": "Question 1?"},
        {"role": "assistant", "content": "Answer 1."}], tokenize=False)
    assert text + "\n" == rendered


def test_multi_turn_refuses_a_template_that_rewrites_answers(tokenizers):
    tokenizer = build_tokenizer(HF, tokenizers[HF])
    tokenizer.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="record 'm0': the chat template .* does not render an "
                                         "assistant turn as its content followed by eos_token"):
        encode_record(tokenizer, parsed(multi_turn_record(0, 2)), ALL_ROLES, LengthLimits())


def test_roles_subset_and_one_sided_records(tokenizers):
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    encoded = encode_record(tokenizer, parsed(record(0)), [Role.LONG_CHOSEN, Role.SHORT_CHOSEN],
                            LengthLimits())
    assert [s.role for s in encoded.sequences] == [Role.SHORT_CHOSEN, Role.LONG_CHOSEN]
    short_only = parsed(record(0, long_context=None))
    encoded = encode_record(tokenizer, short_only, [Role.LONG_CHOSEN], LengthLimits())
    assert encoded.dropped.startswith("no roles") and not encoded.sequences


# ----------------------------------------------------------------------------------------------
# Over-long sequences
# ----------------------------------------------------------------------------------------------
LONG = " ".join(f"fact {i} is red." for i in range(150))


@pytest.mark.parametrize("kind", [SP, HF])
@pytest.mark.parametrize("policy", ["truncate-middle", "truncate-left"])
def test_truncation_cuts_only_the_context(tokenizers, kind, policy):
    tokenizer = build_tokenizer(kind, tokenizers[kind])
    data = record(0, long_context=LONG, rejected="I really do not know the answer to this one.")
    full = by_role(encode_record(tokenizer, parsed(data), ALL_ROLES, LengthLimits()))
    limit = len(full[Role.LONG_CHOSEN][0].tokens) // 2
    cut = encode_record(tokenizer, parsed(data), ALL_ROLES,
                        LengthLimits(max_long_length=limit, overlong=policy))
    assert cut.truncated == ("long",) and cut.dropped is None
    cut = by_role(cut)
    for role in ALL_ROLES:
        (sequence,) = cut[role]
        response = tokenizer.encode_response(data[role.response])
        assert sequence.tokens[-len(response):] == response  # the response is intact
        assert sequence.spans == [(len(sequence.tokens) - len(response), len(sequence.tokens))]
        if role.context == "short":
            assert sequence.tokens == full[role][0].tokens  # under no limit: untouched
            continue
        assert len(sequence.tokens) <= limit
        text = tokenizer.decode(sequence.tokens)
        assert "What is item 0?" in text  # the question and the template survive
        assert ("fact 149 is red." in text) and (("fact 0 is red." in text) == (policy == "truncate-middle"))
    # chosen and rejected keep the same context, so they compare answers to one prompt; the
    # longer of the two (rejected) is cut to just about the limit
    chosen, rejected = cut[Role.LONG_CHOSEN][0], cut[Role.LONG_REJECTED][0]
    assert limit - 8 <= len(rejected.tokens) <= limit
    assert chosen.tokens[:chosen.spans[0][0]] == rejected.tokens[:rejected.spans[0][0]]


def test_drop_policy_and_impossible_limits(tokenizers):
    tokenizer = build_tokenizer(SP, tokenizers[SP])
    data = parsed(record(0, long_context=LONG))
    dropped = encode_record(tokenizer, data, ALL_ROLES, LengthLimits(max_long_length=100, overlong="drop"))
    assert dropped.dropped.startswith("overlong: long sequence of") and "--max-long-length=100" in dropped.dropped
    # a limit that not even the question and answer fit: dropped whatever the policy
    tiny = encode_record(tokenizer, data, ALL_ROLES, LengthLimits(max_short_length=5))
    assert "cannot fit --max-short-length=5 by cutting the context" in tiny.dropped


@pytest.mark.parametrize("kwargs,message", [
    (dict(overlong="truncate-right"), "--overlong 'truncate-right'; valid: truncate-middle"),
    (dict(max_long_length=1), "--max-long-length must be >= 2"),
])
def test_length_flags_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthLimits(**kwargs)
