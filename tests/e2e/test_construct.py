"""The model builds its own data, for real on CPU with a tiny random Llama (Hugging Face backend):
raw documents -> LongPO records and QA records -> SoLoPO records (tools/build_*_data.py) ->
tools/preprocess_data.py -> a few training steps with the matching objective; and a run killed
with SIGKILL during generation (or between writing a block and committing it) resumes with no
duplicate and no missing record, identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_solopo.data.schema import parse_record
from tests.distributed.trainer_common import logging_result, train
from tests.harness import run_distributed
from tests.unit.construct_fixtures import write_documents, write_musique

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# Gold answers are digits: the random model writes one now and then, so some of its samples are
# correct by sub-EM and most are not.
ANSWERS = [str(d % 10) for d in range(8)]
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a chat template; ``tiny["megatron"]()`` converts it once (the
    starting checkpoint of the training runs)."""
    from megatron_solopo.convert.hf_to_megatron import hf_to_megatron
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("construct")
    hf = make_tiny_hf_checkpoint(root / "hf", "llama_gqa_untied", max_position_embeddings=2048)
    converted = []

    def megatron() -> str:
        if not converted:
            converted.append(str(hf_to_megatron(hf, root / "megatron")))
        return converted[0]

    return {"root": root, "hf": str(hf), "megatron": megatron}


def build(tool: str, *args) -> tuple[int, str, str]:
    """Run tools/<tool>.py in a subprocess (the way users do): (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


def build_here(tool: str, *args, capsys) -> tuple[int, str, str]:
    """The same in this process (no interpreter start-up, the model files cached)."""
    import importlib

    module = importlib.import_module(f"tools.{tool}")
    capsys.readouterr()
    code = module.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_records(path) -> list:
    lines = Path(path).read_bytes().splitlines()
    for number, raw in enumerate(lines, start=1):
        record, errors = parse_record(raw, str(path), number)
        assert record is not None, errors
    return [json.loads(raw) for raw in lines]


def preprocess_and_train(tiny, records_path, prefix, objective) -> list:
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.data.preprocess import preprocess

    megatron = tiny["megatron"]()
    tokenizer = str(Path(megatron) / "tokenizer")
    summary = preprocess([str(records_path)], str(prefix), "HuggingFaceTokenizer", tokenizer,
                         max_long_length=1800)
    assert summary.records_written == len(read_records(records_path))
    dataset = PreferenceDataset(str(prefix))
    raw = {
        "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer},
        "data": {"train_prefix": str(prefix), "max_tokens_per_micro_batch": 4096},
        "objective": objective,
        "reference": {"mode": "live"},
        "checkpoint": {"load": megatron},
        "training": {"train_iters": 4, "global_batch_size": min(2, len(dataset)), "seed": 3},
        "optimizer": {"lr": 2e-3, "min_lr": 2e-3, "weight_decay": 0.0, "clip_grad": 1.0},
        "scheduler": {"lr_warmup_iters": 0, "lr_decay_style": "constant"},
        "logging": {"log_interval": 1},
    }
    losses = logging_result(run_distributed(train, 1, raw))["losses"]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    return losses


def test_longpo_documents_to_training(tiny):
    root = tiny["root"] / "longpo"
    root.mkdir()
    docs = write_documents(root / "docs.jsonl", num_docs=3, num_paragraphs=6,
                           sentences_per_paragraph=2)
    output = root / "longpo.jsonl"
    code, out, err = build("build_longpo_data", "--input", docs, "--output", output,
                           "--backend", "hf", "--model", tiny["hf"], "--min-doc-tokens", "100",
                           "--max-doc-tokens", "2000", "--chunk-min-tokens", "60",
                           "--chunk-max-tokens", "200", "--num-questions", "1",
                           "--question-max-new-tokens", "20", "--max-new-tokens", "16",
                           "--seed", "1", "--no-progress")
    assert code == 0, err
    summary = json.loads((root / "longpo.summary.json").read_text())
    records = read_records(output)
    assert summary["complete"] and summary["inputs_read"] == 3
    assert summary["records_written"] == len(records) >= 2
    assert f"records written {len(records)}" in out and "per kept record" in out
    assert not (root / "longpo.jsonl.work").exists()
    turns = sum(len(r["turns"]) for r in records)
    assert any(len(r["turns"]) == 2 for r in records)
    dropped_questions = sum(v for k, v in summary["dropped"].items()
                            if k.startswith(("chosen_", "rejected_", "questions_", "identical")))
    # every chunk is asked for questions, every parsed question answered from its chunk, every
    # kept turn answered from the whole document
    assert summary["model_calls"] >= 3 * turns + dropped_questions
    assert summary["per_kept_record"]["model_calls"] == pytest.approx(
        summary["model_calls"] / len(records), abs=1e-3)
    for record in records:
        assert len(record["evidence_spans"]) == len(record["turns"])
        for (start, end), turn in zip(record["evidence_spans"], record["turns"]):
            assert record["long_context"][start:end] == turn["short_context"]
            assert turn["short_context"] != record["long_context"]
            assert turn["prompt"].split(",")[0] + "," in (REPO / "megatron_solopo" / "construct" /
                                                         "templates" /
                                                         "longpo_reference_phrases.txt").read_text()
    losses = preprocess_and_train(tiny, output, root / "train",
                                  {"name": "longpo", "beta": 0.5, "lambda": 1.0})
    assert losses[-1] < losses[0]


def test_solopo_qa_to_training(tiny):
    root = tiny["root"] / "solopo"
    root.mkdir()
    qa = write_musique(root / "qa.jsonl", ANSWERS)
    output = root / "solopo.jsonl"
    code, out, err = build("build_solopo_data", "--input", qa, "--output", output, "--backend",
                           "hf", "--model", tiny["hf"], "--format", "musique", "--long-length",
                           "500", "--num-samples", "16", "--max-new-tokens", "12",
                           "--batch-size", "4", "--seed", "0", "--no-progress")
    assert code == 0, err
    summary = json.loads((root / "solopo.summary.json").read_text())
    records = read_records(output)
    assert summary["records_written"] == len(records) >= 2, summary
    assert summary["samples"] == 16 * len(ANSWERS)
    assert sum(summary["dropped"].values()) + len(records) == len(ANSWERS)
    assert 0 < summary["compression_ratio"] < 1
    from megatron_solopo.evaluation.metrics import sub_em

    for record in records:
        answers = record["meta"]["answers"]
        assert sub_em(record["chosen"], answers) == 1.0 and sub_em(record["rejected"], answers) == 0
        assert record["meta"]["long_tokens"] <= 500 + 20
        spans = record["evidence_spans"]
        assert len(spans) == 2
        evidence = [record["long_context"][s:e] for s, e in spans]
        assert all(text in record["short_context"] for text in evidence)
        assert "The code of the" in "".join(evidence)
    losses = preprocess_and_train(tiny, output, root / "train",
                                  {"name": "solopo", "base": "dpo", "beta": 0.5, "alpha": 1.0})
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------
# Kill and resume
# ----------------------------------------------------------------------------------------------
_KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
target, after = {target!r}, {after}
calls = [0]
if target == "generate":
    from megatron_solopo.generation import hf as module
    owner, name = module.HFGenerator, "generate"
else:
    from megatron_solopo.construct import runner as module
    owner, name = module.Runner, "_commit"
original = getattr(owner, name)
def hooked(*args, **kwargs):
    calls[0] += 1
    if calls[0] > after:  # the previous blocks are committed; this one dies half-way
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, staticmethod(hooked) if target == "commit" else hooked)
sys.argv = ["build_solopo_data.py"] + {argv!r}
sys.path.insert(0, os.path.join({repo!r}, "tools"))
import build_solopo_data
sys.exit(build_solopo_data.main())
"""


# A user-supplied scoring function (--score module:function): about half of the random model's
# samples count as correct, so most questions give a pair.
SCORE = ("--score", "tests.unit.construct_fixtures:even_length_score")


def _solopo_args(tiny, qa, output, *extra):
    return ["--input", str(qa), "--output", str(output), "--backend", "hf", "--model", tiny["hf"],
            "--num-samples", "4", "--max-new-tokens", "6", "--block-size", "1", "--seed", "2",
            "--no-progress", *map(str, extra)]


@pytest.fixture
def one_thread():
    """Runs here and in the killed subprocesses (OMP_NUM_THREADS=1) must sample the same tokens:
    the same thread count keeps float reductions bit-identical."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigkill_during_generation_resumes_without_loss_or_duplicates(tiny, capsys, one_thread):
    root = tiny["root"] / "resume"
    root.mkdir()
    qa = write_musique(root / "qa.jsonl", [str(d) for d in range(6)], seed=4)
    reference = root / "reference.jsonl"
    code, _, err = build_here("build_solopo_data", *_solopo_args(tiny, qa, reference, *SCORE),
                              capsys=capsys)
    assert code == 0, err
    expected = reference.read_bytes()
    expected_summary = json.loads((root / "reference.summary.json").read_text())

    output = root / "out.jsonl"
    args = _solopo_args(tiny, qa, output, *SCORE)
    # killed in block 3's generation (2 blocks committed), then, resumed, after writing block 5's
    # records but before committing them (4 committed)
    for target, after, committed in (("generate", 2, 2), ("commit", 2, 4)):
        script = _KILLER.format(repo=str(REPO), target=target, after=after, argv=args)
        killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                                text=True, timeout=600, env=ENV)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not output.exists()
        done = (root / "out.jsonl.work" / "shard-00000-of-00001.done.jsonl").read_text()
        assert len(done.splitlines()) == committed
        if target == "commit":  # block 5's records were written, its commit never happened
            shard = root / "out.jsonl.work" / "shard-00000-of-00001.jsonl"
            assert shard.stat().st_size > json.loads(done.splitlines()[-1])["offset"]
    code, out, err = build_here("build_solopo_data", *args, capsys=capsys)
    assert code == 0, err
    assert "resuming" in err and "4 block(s) done" in err
    assert output.read_bytes() == expected
    ids = [json.loads(line)["id"] for line in output.read_bytes().splitlines()]
    assert len(ids) == len(set(ids)) == expected_summary["records_written"] > 0
    summary = json.loads((root / "out.summary.json").read_text())
    for key in ("inputs_read", "records_written", "dropped", "model_calls", "samples",
                "generated_tokens", "settings_sha256"):
        assert summary[key] == expected_summary[key], key
    # a finished run is not redone; other settings for the same output are refused
    code, out, err = build_here("build_solopo_data", *args, capsys=capsys)
    assert code == 0 and "already complete" in err
    code, out, err = build_here("build_solopo_data", *_solopo_args(tiny, qa, output, "--seed", "3"),
                                capsys=capsys)
    assert code == 2 and err.count("error:") == 1 and "--output" in err

    # two shards (as two processes, e.g. torchrun ranks) merge into the same records
    sharded = root / "sharded.jsonl"
    shard_args = _solopo_args(tiny, qa, sharded, *SCORE,
                              "--num-shards", "2")
    code, out, err = build_here("build_solopo_data", *shard_args, "--shard-index", "1",
                                capsys=capsys)
    assert code == 0 and "waiting for 1 other shard" in err and not sharded.exists()
    code, out, err = build_here("build_solopo_data", *shard_args, "--shard-index", "0",
                                capsys=capsys)
    assert code == 0, err
    assert [json.loads(x)["id"] for x in sharded.read_bytes().splitlines()] == ids
    assert sharded.read_bytes() == expected
