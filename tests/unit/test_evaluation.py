"""Evaluation: examples by length, streamed and resumable answering with exact metrics (a scripted
backend whose answers are known), summaries and tables, preference metrics on a real tiny model,
and tools/evaluate.py end to end on a tiny Hugging Face checkpoint."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_solopo.evaluation import report, runner, tasks
from megatron_solopo.generation import Completion, Generator

REPO = Path(__file__).resolve().parents[2]


class ScriptedGenerator(Generator):
    """Answers from the context: the number after the asked key/needle when ``right`` says so,
    else a wrong one. Counts the prompts it is given."""

    def __init__(self, right=lambda example_id: True):
        self.right = right
        self.prompts = 0

    def generate(self, requests, desc="generating"):
        out = []
        for request in requests:
            self.prompts += 1
            text = request.messages[-1]["content"]
            question = text.rsplit("\n\n", 1)[-1]
            if "key" in question:
                key = re.search(r"key (\w+)\?", question).group(1)
                value = re.search(rf"key {key} has value (\d+)", text).group(1)
            else:
                thing = re.search(r"the (\w+ \w+)\?", question).group(1)
                value = re.search(rf"secret number of the {thing} is (\d+)", text).group(1)
            answer = f"It is {value}." if self.right(request.key) else "It is 1000."
            out.append(Completion([answer], len(text.split()), 3))
        return out


def test_synthetic_examples_by_length():
    examples = tasks.synthetic_examples("kv_retrieval", 6, [1, 2, 4], seed=3)
    assert [e.length for e in examples] == ["1x"] * 6 + ["2x"] * 6 + ["4x"] * 6
    words = {length: sum(len(e.context.split()) for e in examples if e.length == length) / 6
             for length in ("1x", "2x", "4x")}
    unit = tasks.short_words("kv_retrieval")
    assert math.isclose(words["1x"], unit, rel_tol=0.3)
    assert words["1x"] < words["2x"] < words["4x"]
    assert math.isclose(words["4x"], 4 * unit, rel_tol=0.3)
    for example in examples:  # the answer is in the context, the question at the end
        assert example.answers[0] in example.context
        assert example.messages()[-1]["content"].endswith(example.question)
    assert len({e.id for e in examples}) == len(examples)
    again = tasks.synthetic_examples("kv_retrieval", 6, [1, 2, 4], seed=3)
    assert [e.context for e in again] == [e.context for e in examples]


@pytest.mark.parametrize("text, message", [("1,x", "integers"), ("0,2", "distinct integers >= 1"),
                                           ("2,2", "distinct"), ("", "distinct")])
def test_parse_multipliers_errors(text, message):
    with pytest.raises(ValueError, match=message):
        tasks.parse_multipliers(text)


def test_jsonl_examples(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"id": "a", "question": "Q1?", "answers": ["x", "y"], "context": "C1", "length": "4k"},
        {"prompt": "Q2?", "long_context": "L", "short_context": "S", "meta": {"answer": "z"}},
        {"input": "Q3?", "answer": 7},
    ]) + "\n\n")
    first, second, third = tasks.jsonl_examples(str(path))
    assert (first.id, first.answers, first.context, first.length) == ("a", ["x", "y"], "C1", "4k")
    assert (second.id, second.answers, second.context) == ("line2", ["z"], "L")
    assert (third.answers, third.context, third.length) == (["7"], None, "all")
    assert tasks.jsonl_examples(str(path), context_field="short_context")[1].context == "S"


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"}', "q.jsonl:2: no gold answer"),
    ('{"answer": "a"}', "q.jsonl:2: no question"),
    ("[1]", "q.jsonl:2: not a JSON object"),
    ("{", "q.jsonl:2: invalid JSON"),
    ('{"id": "a", "question": "q", "answer": "b"}', "q.jsonl:2: duplicate id 'a'"),
    ('{"turns": [], "question": "q", "answer": "b"}', "multi-turn"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "question": "q", "answer": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        tasks.jsonl_examples(str(path))


def _examples():
    return (tasks.synthetic_examples("kv_retrieval", 5, [1, 4], seed=1)
            + tasks.synthetic_examples("needle", 5, [1, 4], seed=1))


def test_answers_scored_exactly(tmp_path):
    examples = _examples()
    # right on every 1x question and on the first two 4x ones of each task
    wrong = {e.id for e in examples if e.length == "4x" and int(e.id.rsplit("-", 1)[1]) >= 2}
    generator = ScriptedGenerator(lambda key: key not in wrong)
    rows = runner.answer_examples(generator, examples, tmp_path / "r.jsonl",
                                  settings={"checkpoint": "scripted"}, chunk_size=3, log=lambda m: None)
    assert len(rows) == 20 and generator.prompts == 20
    summary = report.summarize(rows)
    for task in ("kv_retrieval", "needle"):
        assert summary["by_length"][task]["1x"]["sub_em"] == 1.0
        assert summary["by_length"][task]["4x"]["sub_em"] == pytest.approx(2 / 5)
        assert summary["by_length"][task]["4x"]["n"] == 5
    assert summary["by_length"]["all"]["4x"]["sub_em"] == pytest.approx(0.4)
    # F1 of "It is 123." against "123": tokens it/is/123, precision 1/3, recall 1 -> 1/2
    assert summary["by_length"]["all"]["1x"]["f1"] == pytest.approx(0.5)
    assert summary["retention"] == {"length": "1x", "sub_em": 1.0}
    # no short bucket (e.g. a JSONL without "length": "short"): no retention score
    assert "retention" not in report.summarize([dict(row, length="all") for row in rows])
    table = report.table({"scripted": summary})
    assert "| scripted | 1.000 | 0.400 |" in table
    baseline = {"retention": {"length": "1x", "sub_em": 0.5}}
    report.add_retention_ratio(summary, baseline)
    assert summary["retention"]["ratio"] == 2.0


def test_resume_skips_done_examples_and_drops_a_torn_line(tmp_path):
    examples = _examples()
    path = tmp_path / "r.jsonl"
    first = ScriptedGenerator()
    runner.answer_examples(first, examples[:7], path, settings={"m": 1}, log=lambda m: None)
    with open(path, "a") as handle:
        handle.write('{"id": "torn')  # a kill in the middle of a write
    second = ScriptedGenerator()
    rows = runner.answer_examples(second, examples, path, settings={"m": 1}, log=lambda m: None)
    assert second.prompts == 13 and len(rows) == 20
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and len({json.loads(line)["id"] for line in lines}) == 20
    with pytest.raises(ValueError, match="other settings.*m differ"):
        runner.answer_examples(ScriptedGenerator(), examples, path, settings={"m": 2})


def test_plot_needs_matplotlib_or_says_so(tmp_path, monkeypatch):
    series = {"a": {"1x": 0.5, "2x": 0.25}}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(report.MissingPlotting, match="pip install matplotlib"):
            report.plot_accuracy_vs_length(series, str(tmp_path / "p.png"))
        return
    path = report.plot_accuracy_vs_length(series, str(tmp_path / "p.png"))
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(report.MissingPlotting, match="pip install matplotlib"):
        report.plot_accuracy_vs_length(series, str(tmp_path / "q.png"))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "model", "llama_gqa_untied",
                                   max_position_embeddings=2048)


def test_preference_metrics_on_a_real_model(tiny_hf, tmp_path):
    from megatron_solopo.convert.verify import hf_logprobs
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.tokenizers import HuggingFaceTokenizer

    records = synthetic.generate_records("kv_retrieval", 4, seed=5, long_length=40)
    # against itself as reference: every reward is exactly 0, so no pair is "won" (ties lose)
    same = runner.preference_metrics(str(tiny_hf), records, reference_dir=str(tiny_hf))
    assert set(same) == {"short", "long"}
    assert same["long"]["pairs"] == 4 and same["long"]["rewards/accuracies"] == 0.0
    assert same["long"]["rewards/margins"] == 0.0
    # without a reference: beta * summed log-probs, as the project's own HF log-prob code gives
    values = runner.preference_metrics(str(tiny_hf), records, beta=0.5)
    tokenizer = HuggingFaceTokenizer(str(tiny_hf))
    sequences, starts = [], []
    for record in records:
        prompt = tokenizer.encode_prompt(None, record["short_context"], record["prompt"])
        for text in (record["chosen"], record["rejected"]):
            sequences.append(prompt + tokenizer.encode_response(text))
            starts.append(len(prompt))
    token_logps = hf_logprobs(str(tiny_hf), sequences)  # per position: log p(token t+1)
    sums = [float(lp[start - 1:].sum()) for lp, start in zip(token_logps, starts)]
    margins = [0.5 * (sums[i] - sums[i + 1]) for i in range(0, len(sums), 2)]
    assert values["short"]["rewards/margins"] == pytest.approx(sum(margins) / 4, rel=1e-5)
    assert values["short"]["rewards/accuracies"] == sum(m > 0 for m in margins) / 4


def _evaluate(*args):
    """tools/evaluate.py in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    sys.path.insert(0, str(REPO))
    from tools import evaluate

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_evaluate_tool_on_a_tiny_model_resumes(tiny_hf, tmp_path):
    out = tmp_path / "eval"
    args = ["--checkpoint", f"tiny={tiny_hf}", "--synthetic", "needle", "--lengths", "1,2",
            "--num-examples", "3", "--max-new-tokens", "4", "--output", out, "--no-plot"]
    code, _, stderr = _evaluate(*args)
    assert code == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (out / "tiny" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {row["length"] for row in rows} == {"1x", "2x"}
    assert all(0.0 <= row["sub_em"] <= 1.0 and 0.0 <= row["f1"] <= 1.0 for row in rows)
    summary = json.loads((out / "summary.json").read_text())["tiny"]
    assert summary["by_length"]["needle"]["1x"]["n"] == 3
    two_x = summary["by_length"]["needle"]["2x"]
    assert two_x["prompt_tokens"] > summary["by_length"]["needle"]["1x"]["prompt_tokens"]
    assert "| all sub_em | 1x | 2x |" in (out / "table.md").read_text()
    code, stdout, _ = _evaluate(*args)
    assert code == 0 and "6 answers already there, 0 to go" in stdout
    assert len((out / "tiny" / "results.jsonl").read_text().splitlines()) == 6


def test_evaluate_tool_converts_our_checkpoint(tiny_hf, tmp_path):
    """Our checkpoint of the same weights answers exactly as the Hugging Face one (greedy)."""
    ours = tmp_path / "ours"
    command = [sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir",
               str(tiny_hf), "--output", str(ours)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "tools/evaluate.py", "--checkpoint", f"hf={tiny_hf}", "--checkpoint",
         f"ours={ours}", "--synthetic", "kv_retrieval", "--lengths", "1,2", "--num-examples", "2",
         "--max-new-tokens", "6", "--output", str(out), "--no-plot"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "hf" / "ours" / "config.json").exists()

    def predictions(name):
        rows = (out / name / "results.jsonl").read_text().splitlines()
        return {row["id"]: row["prediction"] for row in map(json.loads, rows)}

    assert predictions("ours") == predictions("hf") and len(predictions("hf")) == 4


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "/nonexistent"], "does not exist"),
    (["--checkpoint", "{hf}", "--lengths", "0"], "--lengths"),
    (["--checkpoint", "{hf}", "--synthetic", "nope"], "--synthetic 'nope'"),
    (["--checkpoint", "a={hf}", "--baseline", "b"], "--baseline b"),
    (["--checkpoint", "{hf}", "--checkpoint", "{hf}"], "used twice"),
])
def test_evaluate_tool_user_errors(tiny_hf, tmp_path, extra, message):
    extra = [e.replace("{hf}", str(tiny_hf)) for e in extra]
    if "--synthetic" not in extra:
        extra += ["--synthetic", "needle"]
    code, _, stderr = _evaluate(*extra, "--output", tmp_path / "o")
    assert code == 2, stderr[-2000:]
    assert stderr.count("error:") == 1 and message in stderr
