"""Construction pieces on crafted text: question parsing, filters, paragraphs, chunks, templates,
QA adapters (megatron_solopo/construct/)."""

import json

import pytest

from megatron_solopo.construct.inputs import InputFiles, document_parser
from megatron_solopo.construct.qa_formats import qa_parser
from megatron_solopo.construct.text import (AnswerFilter, Templates, group_chunks, parse_questions,
                                            repeated_word_ratio, split_paragraphs)
from tests.unit.construct_fixtures import musique_record, to_hotpotqa


def test_parse_questions_numbered_styles():
    text = ("Here are four questions:\n1. What is A?\n2) Why B?\n**3.** How does C relate to D?\n"
            "Q4: Where is E?\nThanks!")
    assert parse_questions(text) == ["What is A?", "Why B?", "How does C relate to D?",
                                     "Where is E?"]


def test_parse_questions_stops_at_broken_numbering():
    assert parse_questions("1. a?\n2. b?\n4. d?\n5. e?") == ["a?", "b?"]
    assert parse_questions("1. a?\n1. again?") == ["a?"]
    assert parse_questions("no list here") == []


def test_parse_questions_single_unnumbered():
    assert parse_questions("\n  What does the river cross?\nmore", expected=1) == [
        "What does the river cross?"]
    assert parse_questions("What?", expected=2) == []
    assert parse_questions("1. Numbered wins?\nother", expected=1) == ["Numbered wins?"]


def test_repetition_and_filters():
    assert repeated_word_ratio("") == 0.0
    assert repeated_word_ratio("a b c d") == 0.0
    assert repeated_word_ratio("go " * 20) == pytest.approx(0.95)
    refusals = ["i'm sorry", "as an ai"]
    chosen = AnswerFilter(refusals, max_repetition=0.9)
    assert chosen.reason("   ") == "empty"
    assert chosen.reason("the river " * 30) == "repetitive"  # ratio 1 - 2/60
    assert chosen.reason("ok no") == "repetitive"  # fewer than 2 words of 3+ characters
    assert chosen.reason("I'm Sorry, the text does not say that.") == "refusal"
    assert chosen.reason("As an AI model I will still answer.") == "refusal"
    assert chosen.reason("The river crosses the old village.") is None
    # 19 distinct of 20 words: ratio 0.05, kept by both thresholds
    assert AnswerFilter([], 0.95).reason(" ".join(f"word{i}" for i in range(19)) + " word0") is None
    # ratio between the two thresholds (0.92): dropped as chosen (0.9), kept as rejected (0.95)
    text = " ".join(["alpha"] * 36 + ["beta", "gamma"])  # 1 - 3/38
    assert AnswerFilter([], 0.9).reason(text) == "repetitive"
    assert AnswerFilter([], 0.95).reason(text) is None
    assert AnswerFilter([], 0.9, min_long_words=0).reason("Lyon") is None


def test_split_paragraphs_rules():
    assert split_paragraphs("a\n\nb\n  \nc\n") == ["a", "b", "c"]
    latex = "intro\n\\section{One}\ntext one\n\n more\n\\subsection*{Two}\ntext two"
    assert split_paragraphs(latex) == ["intro", "\\section{One}\ntext one\n\n more",
                                       "\\subsection*{Two}\ntext two"]
    assert split_paragraphs(latex, "blank-lines")[0] == "intro\n\\section{One}\ntext one"
    assert split_paragraphs("a;b;;c", "regex:;+") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="--split-rule"):
        split_paragraphs("x", "sentences")
    with pytest.raises(ValueError, match="invalid regular expression"):
        split_paragraphs("x", "regex:(")


def test_group_chunks_greedy_and_out_of_range():
    count = lambda text: len(text.split())  # noqa: E731
    paragraphs = ["w " * 4, "w " * 4, "w " * 4, "w " * 30, "w " * 2, "w " * 9, "w " * 1]
    chunks, dropped = group_chunks([p.strip() for p in paragraphs], count, 5, 10)
    # [4+4] closes at the next 4 -> kept (8); [4] then 30 does not fit -> 4 < 5 dropped;
    # [30] alone > 10 -> dropped; [2] then 9 -> 2 dropped; [9+1] = 10 kept
    assert [count(c) for c in chunks] == [8, 10]
    assert dropped == 3
    assert chunks[0] == "w w w w\n\nw w w w"


def test_templates_override_and_placeholders(tmp_path):
    shipped = Templates()
    prompt = shipped.fill("longpo_questions.txt", context="CTX {not a placeholder}",
                          num_questions=3)
    assert prompt.startswith("Context:\nCTX {not a placeholder}") and "generate 3" in prompt
    assert len(shipped.lines("longpo_reference_phrases.txt")) == 20
    assert not any(line.startswith("#") for line in shipped.lines("refusal_phrases.txt"))
    (tmp_path / "solopo_question.txt").write_text("Q: {question}\n")
    custom = Templates(str(tmp_path))
    assert custom.fill("solopo_question.txt", question="why?") == "Q: why?"
    assert custom.text("longpo_questions.txt") == shipped.text("longpo_questions.txt")
    (tmp_path / "solopo_question.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match=r"no \{question\} placeholder"):
        Templates(str(tmp_path)).fill("solopo_question.txt", question="why?")
    (tmp_path / "typo.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown template file.*typo.txt"):
        Templates(str(tmp_path))


def test_qa_adapters_agree(tmp_path):
    import random

    record = musique_record(random.Random(0), 3, "42")
    _, musique = qa_parser("musique")(record, "m.jsonl:1")
    _, hotpot = qa_parser("hotpotqa")(to_hotpotqa(record), "h.jsonl:1")
    for item in (musique, hotpot):
        assert item.answers[0] == "42"
        assert [p.is_supporting for p in item.paragraphs] == [
            p["is_supporting"] for p in record["paragraphs"]]
    assert musique.paragraphs[0].render().startswith("Title: Place 3-0\n")
    record["answerable"] = False
    assert qa_parser("musique")(record, "m.jsonl:1")[1].skip == "unanswerable"


def test_input_errors_name_file_line_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = musique_record(__import__("random").Random(0), 0, "1")
    bad = dict(good, id="q-9")
    bad["paragraphs"] = [dict(good["paragraphs"][0], is_supporting="yes")]
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:3: paragraphs\[0\]: field 'is_supporting': "
                                         r"should be bool"):
        InputFiles([str(path)], qa_parser("musique")).check()
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: id 'q-0' repeats the one at .*qa.jsonl:1"):
        InputFiles([str(path)], qa_parser("musique")).check()
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "x"}\n{"id": "b", "body": "y"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: field 'text': missing"):
        InputFiles([str(docs)], document_parser()).check()
    docs.write_text('{"id": "a", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: invalid JSON"):
        InputFiles([str(docs)], document_parser()).check()
    text = tmp_path / "book.txt"
    text.write_text("a whole book")
    files = InputFiles([str(text)], document_parser())
    files.check()
    assert list(files.items()) == [(0, "book.txt", "a whole book")]
