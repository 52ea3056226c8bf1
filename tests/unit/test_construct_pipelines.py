"""The pipelines' decisions with a scripted backend whose answers the test chooses (the real
backends are exercised in tests/e2e/test_construct.py): sub-EM selection of chosen/rejected,
drop reasons, LongPO's question parsing, filters and multi-turn grouping, the run's bookkeeping."""

import json
import random

import pytest

from megatron_solopo.construct.longpo import CHUNK_JOIN, LongPOPipeline, LongPOSettings
from megatron_solopo.construct.runner import Runner
from megatron_solopo.construct.solopo import SoLoPOPipeline, SoLoPOSettings
from megatron_solopo.construct.text import Templates
from megatron_solopo.evaluation.metrics import normalize_answer
from megatron_solopo.generation import Completion, SamplingParams
from tests.unit.construct_fixtures import musique_record, write_documents


class Scripted:
    """A backend answering ``respond(user text, request) -> [texts]``; tokens are words."""

    def __init__(self, respond):
        self.respond, self.requests = respond, []

    def generate(self, requests, desc=""):
        self.requests += requests
        out = []
        for request in requests:
            texts = self.respond(request.messages[-1]["content"], request)
            assert len(texts) == request.params.n
            out.append(Completion(texts, self.count_tokens(request.messages[-1]["content"]),
                                  sum(self.count_tokens(t) for t in texts)))
        return out

    def count_tokens(self, text):
        return len(text.split())


def write_qa(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def solopo(tmp_path, records, respond, **settings):
    settings.setdefault("sampling", SamplingParams(temperature=0.85, max_new_tokens=8, n=4))
    pipeline = SoLoPOPipeline([write_qa(tmp_path / "qa.jsonl", records)],
                              SoLoPOSettings(**settings), Templates())
    backend = Scripted(respond)
    summary = Runner(pipeline, str(tmp_path / "out" / "solopo.jsonl"), block_size=2,
                     log=lambda m: None).run(lambda: backend)
    lines = (tmp_path / "out" / "solopo.jsonl").read_text().splitlines()
    return summary, [json.loads(x) for x in lines], backend


def test_solopo_sub_em_selection_and_drop_reasons(tmp_path):
    rng = random.Random(0)
    records = [musique_record(rng, i, answer) for i, answer in enumerate(
        ["Lyon", "Paris", "Rome", "Oslo", "Bern"])]
    records[1]["answer_aliases"] = ["City of Light"]
    records[4]["answerable"] = False
    script = {
        "q-0": ["Answer: the LYON.", "Answer: Paris", "Answer: lyon", "I think Lyon. Answer: Nice"],
        "q-1": ["Answer: city of light!", "Answer: Rome", "", "Answer: Oslo"],
        "q-2": ["Answer: Rome"] * 4,  # every sample correct
        "q-3": ["I'm sorry, Answer: Oslo", "Answer: Bern", "Answer: Bern", "Answer: Bern"],
    }
    summary, out, backend = solopo(
        tmp_path, records, lambda text, request: script[request.key.split("/")[0]])
    by_id = {r["id"]: r for r in out}
    assert sorted(by_id) == ["q-0", "q-1"]
    # scored after the last "Answer:": "I think Lyon. Answer: Nice" is incorrect
    assert by_id["q-0"]["chosen"] in ("Answer: the LYON.", "Answer: lyon")
    assert by_id["q-0"]["rejected"] in ("Answer: Paris", "I think Lyon. Answer: Nice")
    assert by_id["q-1"]["chosen"] == "Answer: city of light!"  # an alias
    assert by_id["q-1"]["rejected"] in ("Answer: Rome", "Answer: Oslo")  # never the empty one
    assert by_id["q-0"]["meta"]["num_correct"] == 2
    assert summary["dropped"] == {"no_incorrect_sample": 1, "correct_samples_filtered": 1,
                                  "unanswerable": 1}
    assert summary["inputs_read"] == 5 and summary["records_written"] == 2
    assert summary["model_calls"] == 4 and summary["samples"] == 16
    assert summary["per_kept_record"]["model_calls"] == 2.0
    assert summary["sample_accuracy"] == pytest.approx((2 + 1 + 4 + 1) / 16)
    # the user turn at generation is exactly the record's short context + prompt
    first = backend.requests[0].messages[-1]["content"]
    assert first == by_id["q-0"]["short_context"] + "\n\n" + by_id["q-0"]["prompt"]
    assert by_id["q-0"]["prompt"].startswith("What is the code of the river?\n\nAnswer the")


def test_solopo_long_context_budget_and_evidence(tmp_path):
    rng = random.Random(1)
    records = [musique_record(rng, i, str(i)) for i in range(6)]
    summary, out, _ = solopo(tmp_path, records, lambda text, request: [
        f"Answer: {request.key.split('-')[1].split('/')[0]}", "no", "no", "no"][:request.params.n],
        long_length=400, short_distractors=1, long_samples=2)
    assert len(out) == 6
    for record in out:
        long, short = record["long_context"], record["short_context"]
        assert 300 < len(long.split()) <= 400
        assert record["meta"]["long_tokens"] == len(long.split())
        evidence = [long[s:e] for s, e in record["evidence_spans"]]
        assert len(evidence) == 2 and all(e in short for e in evidence)
        assert short.count("Title: ") == 3  # two supporting + one distractor
        # distractors from other records join, never one containing the gold answer
        others = [p for p in long.split("Title: ")[1:] if f"Place {record['id'][2:]}-" not in p]
        assert others and not any(normalize_answer(record["id"][2:]) in normalize_answer(p)
                                  for p in others)
        assert record["meta"]["long_pair"] == {"chosen": f"Answer: {record['id'][2:]}",
                                               "rejected": "no"}
    assert 0 < summary["compression_ratio"] < 1


def test_longpo_questions_filters_and_turns(tmp_path):
    docs = write_documents(tmp_path / "docs.jsonl", num_docs=3, num_paragraphs=6,
                           sentences_per_paragraph=2)
    counter = {"chosen": 0}

    def respond(text, request):
        doc, chunk, stage = request.key.split("/")
        if stage == "questions":
            if doc == "doc-2":
                return ["1. Only one question?"]  # not the 2 asked for
            return [f"Sure:\n1. First about {chunk}?\n2) Second about {chunk}?"]
        if stage == "chosen":
            counter["chosen"] += 1
            return ["As an AI model, I cannot answer that question."] if chunk == "chunk1" else [f"Chosen answer for {chunk}."]
        return [f"Chosen answer for {chunk}."] if chunk == "chunk2" else [
            f"Rejected answer for {chunk}."]

    settings = LongPOSettings(chunk_min_tokens=20, chunk_max_tokens=40, num_questions=2,
                              max_turns=2, seed=3)
    pipeline = LongPOPipeline([str(docs)], settings, Templates())
    backend = Scripted(respond)
    output = tmp_path / "longpo.jsonl"
    summary = Runner(pipeline, str(output), log=lambda m: None).run(lambda: backend)
    records = [json.loads(x) for x in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["doc-0", "doc-1"]
    for record in records:
        chunks = record["long_context"].split(CHUNK_JOIN)
        assert record["meta"]["chunks"] == len(chunks) >= 3
        # 2 of the chunks whose chosen answers passed were asked for a rejected answer; a turn
        # whose rejected equals its chosen (chunk 2) is dropped
        asked = sorted(int(r.key.split("/")[1][5:]) for r in backend.requests
                       if r.key.startswith(record["id"] + "/") and r.key.endswith("/rejected"))
        assert len(asked) == 2 and 1 not in asked
        assert record["meta"]["turn_chunks"] == [c for c in asked if c != 2]
        assert record["meta"]["turn_chunks"] == sorted(record["meta"]["turn_chunks"])
        for turn, chunk_index in zip(record["turns"], record["meta"]["turn_chunks"]):
            assert chunk_index not in (1,)  # refused chosen answers never make a turn
            assert turn["short_context"] == chunks[chunk_index]
            assert turn["chosen"] == f"Chosen answer for chunk{chunk_index}."
            phrase, question = turn["prompt"].split(", ", 1)
            assert phrase + "," in Templates().lines("longpo_reference_phrases.txt")
            assert question in (f"First about chunk{chunk_index}?",
                                f"Second about chunk{chunk_index}?")
    num_chunks = sum(r["meta"]["chunks"] for r in records)
    dropped = summary["dropped"]
    assert dropped["questions_unparsed"] >= 3  # every chunk of doc-2
    assert dropped["no_turn_left"] == 1 and dropped["chosen_refusal"] == 2
    assert dropped.get("identical", 0) + sum(len(r["turns"]) for r in records) == sum(
        1 for r in backend.requests if r.key.endswith("/rejected"))
    # questions for every chunk; chosen for every parsed question; rejected per kept turn
    assert summary["model_calls"] == len(backend.requests)
    assert counter["chosen"] == num_chunks
    assert all(r.params == settings.question_sampling for r in backend.requests
               if r.key.endswith("/questions"))


def test_runner_refuses_changed_settings_and_leaves_nothing_on_failure(tmp_path):
    rng = random.Random(0)
    qa = write_qa(tmp_path / "qa.jsonl", [musique_record(rng, i, "x") for i in range(3)])
    output = tmp_path / "new" / "dir" / "out.jsonl"

    def pipeline(seed):
        return SoLoPOPipeline([qa], SoLoPOSettings(seed=seed), Templates())

    def broken():
        raise ValueError("--backend vllm needs vLLM")

    with pytest.raises(ValueError, match="needs vLLM"):
        Runner(pipeline(0), str(output), log=lambda m: None).run(broken)
    assert not (tmp_path / "new").exists()

    # an interrupted run (a committed block), then other settings for the same output
    calls = {"n": 0}

    def flaky(text, request):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("killed")
        return ["Answer: x"] + ["no"] * 31

    with pytest.raises(RuntimeError):
        Runner(pipeline(0), str(output), block_size=1, log=lambda m: None).run(
            lambda: Scripted(flaky))
    assert (output.parent / "out.jsonl.work").is_dir()
    with pytest.raises(ValueError, match=r"interrupted run with other settings \(changed: recipe\)"):
        Runner(pipeline(1), str(output), block_size=1, log=lambda m: None).run(
            lambda: Scripted(flaky))
    logs = []
    summary = Runner(pipeline(0), str(output), block_size=1, log=logs.append).run(
        lambda: Scripted(lambda text, request: ["Answer: x"] + ["no"] * 31))
    assert "1 block(s) done" in logs[0]
    assert summary["records_written"] == 3 and summary["model_calls"] == 3


def test_resume_cuts_uncommitted_bytes_and_completes_a_cut_commit(tmp_path):
    rng = random.Random(0)
    qa = write_qa(tmp_path / "qa.jsonl", [musique_record(rng, i, "x") for i in range(4)])

    def answers(text, request):
        return [f"Answer: x {request.key}"] + [f"no {i}" for i in range(31)]

    def run(output, respond):
        pipeline = SoLoPOPipeline([qa], SoLoPOSettings(), Templates())
        return Runner(pipeline, str(output), block_size=1, log=lambda m: None).run(
            lambda: Scripted(respond))

    run(tmp_path / "reference.jsonl", answers)
    calls = {"n": 0}

    def dies_at_third(text, request):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return answers(text, request)

    output = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(output, dies_at_third)
    work = tmp_path / "out.jsonl.work"
    done = work / "shard-00000-of-00001.done.jsonl"
    shard = work / "shard-00000-of-00001.jsonl"
    assert len(done.read_text().splitlines()) == 2
    done.write_bytes(done.read_bytes().rstrip(b"\n"))  # killed just before the commit's newline
    with open(shard, "ab") as handle:
        handle.write(b'{"i": 2, "record": {"id": "q-2", "prom')  # a block never committed
    summary = run(output, answers)
    assert output.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    assert summary["records_written"] == 4 and summary["model_calls"] == 4
    assert not work.exists()


def test_longpo_rejected_answers_from_a_second_generator(tmp_path):
    """--long-rope-theta & co.: the whole-document answers come from another generator (the
    model with a raised RoPE theta); its calls count in the same summary."""
    from tools.build_longpo_data import build_parser, long_generator

    docs = write_documents(tmp_path / "docs.jsonl", num_docs=2, num_paragraphs=6,
                           sentences_per_paragraph=2)

    def short(text, request):
        stage = request.key.rsplit("/", 1)[1]
        return ["What does the text say?"] if stage == "questions" else ["The chunk answer here."]

    long_backend = Scripted(lambda text, request: ["The whole document answer."])
    settings = LongPOSettings(chunk_min_tokens=20, chunk_max_tokens=40, num_questions=1)
    pipeline = LongPOPipeline([str(docs)], settings, Templates(),
                              long_generator_factory=lambda: long_backend,
                              long_generation={"rope_theta": 1e7})
    backend = Scripted(short)
    summary = Runner(pipeline, str(tmp_path / "out.jsonl"), log=lambda m: None).run(
        lambda: backend)
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(t["rejected"] == "The whole document answer." and
               t["chosen"] == "The chunk answer here." for r in records for t in r["turns"])
    assert {r.key.rsplit("/", 1)[1] for r in long_backend.requests} == {"rejected"}
    assert "rejected" not in {r.key.rsplit("/", 1)[1] for r in backend.requests}
    assert summary["model_calls"] == len(backend.requests) + len(long_backend.requests)

    args = build_parser().parse_args([
        "--input", "x", "--output", "y", "--backend", "hf", "--model", "m", "--rope-theta", "1e6",
        "--long-rope-theta", "1e7", "--long-max-model-len", "131072"])
    factory, long_settings = long_generator(args)
    assert factory is not None and long_settings["rope_theta"] == 1e7
    assert long_settings["max_model_len"] == 131072 and long_settings["model"] == "m"
    args = build_parser().parse_args(["--input", "x", "--output", "y", "--backend", "hf",
                                      "--model", "m"])
    assert long_generator(args) == (None, None)
