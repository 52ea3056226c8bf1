"""The README workflow on one device and the failures around it: a converted tiny Llama trained
with examples/solopo_converted_single.yaml as written (only the paths replaced), the run's ending,
megatron-to-hf's ending and its refusals of a damaged checkpoint, verify_conversion's verdict."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SINGLE = REPO / "examples" / "solopo_converted_single.yaml"


def run(*args, expect=0, timeout=900):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == expect, f"{args}\n{result.stdout[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Convert a tiny HF Llama, make data with its tokenizer, precompute and train 2 steps with
    the single-device example (paths and the number of steps on the command line, nothing else)."""
    from megatron_solopo.convert import hf_to_megatron
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("single")
    hf = make_tiny_hf_checkpoint(root / "hf", "llama_gqa_untied", max_position_embeddings=4096)
    converted = hf_to_megatron(hf, root / "megatron")
    records = synthetic.generate_records("multidoc_qa", 8, seed=0, long_length=120)
    synthetic.write_jsonl(records, str(root / "train.jsonl"))
    preprocess([str(root / "train.jsonl")], str(root / "train"), "HuggingFaceTokenizer",
               str(converted / "tokenizer"))
    paths = [f"checkpoint.load={converted}", f"data.train_prefix={root / 'train'}",
             f"checkpoint.save={root / 'run'}", "training.train_iters=2"]
    run("tools/precompute_reference.py", "--config", SINGLE, *paths)
    log = run("-m", "megatron_solopo.train", "--config", SINGLE, *paths)
    return {"root": root, "hf": hf, "converted": converted, "save": root / "run", "log": log}


def test_single_device_example_trains_and_ends_with_a_summary(trained):
    log = trained["log"]
    assert " iteration        2/       2 |" in log
    summary = log[log.index("[megatron-solopo] summary:"):]
    assert summary.startswith("[megatron-solopo] summary: iterations 0 -> 2 of 2, skipped "
                              "(NaN/Inf) 0, wall time")
    assert f"checkpoint: {trained['save'] / 'iter_0000002'}" in summary
    assert (f"next: python tools/convert_checkpoint.py megatron-to-hf --megatron-dir "
            f"{trained['save']} --output") in summary
    for noise in ("GPTModel IS DEPRECATED", "full scope is deprecated", "DTensor"):
        assert noise not in log


def test_megatron_to_hf_says_what_it_wrote(trained, tmp_path, capsys):
    from tools.convert_checkpoint import main

    output = tmp_path / "hf_out"
    assert main(["megatron-to-hf", "--megatron-dir", str(trained["save"]),
                 "--output", str(output), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert (f"[convert] {trained['save'] / 'iter_0000002'} (iteration 2) -> {output}: bfloat16; "
            f"the original Hugging Face model was float32") in out
    config = json.loads((output / "config.json").read_text())
    source = json.loads((trained["hf"] / "config.json").read_text())
    for field in ("id2label", "label2id"):
        assert (field in config) == (field in source)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_megatron_to_hf_names_a_damaged_shard(trained, tmp_path, capsys, damage):
    from tools.convert_checkpoint import main

    copy = tmp_path / "ckpt"
    shutil.copytree(trained["save"], copy)
    (shard,) = (copy / "iter_0000002").glob("*.distcp")
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    else:
        shard.unlink()
    output = tmp_path / "hf_out"
    assert main(["megatron-to-hf", "--megatron-dir", str(copy), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: {re.escape(str(copy / 'iter_0000002'))}: cannot read weight "
                     rf"'[\w.]+' \(\w+: .*\); a shard file is missing or damaged$", err,
                     re.MULTILINE | re.DOTALL), err
    assert not output.exists() and not list(tmp_path.glob(".hf_out.tmp-*"))


def test_verify_conversion_prints_a_verdict(trained, capsys):
    from tools.verify_conversion import main

    args = ["--hf-dir", str(trained["hf"]), "--megatron-dir", str(trained["converted"])]
    assert main(args) == 0
    assert re.search(r"^PASS: max abs diff \S+ <= --tolerance 0.0001$", capsys.readouterr().out,
                     re.MULTILINE)
    assert main(args + ["--megatron-dir", str(trained["save"])]) == 1  # trained: differs
    assert "FAIL: max abs diff" in capsys.readouterr().err


def test_a_corrupt_reference_cache_is_a_message(trained, tmp_path):
    root = trained["root"]
    (cache,) = root.glob("train.reference-*.npz")
    saved = cache.read_bytes()
    try:
        cache.write_bytes(saved[:100])
        out = run("-m", "megatron_solopo.train", "--config", SINGLE,
                  f"checkpoint.load={trained['converted']}", f"data.train_prefix={root / 'train'}",
                  f"checkpoint.save={tmp_path / 'run'}", "training.train_iters=2", expect=2)
    finally:
        cache.write_bytes(saved)
    (line,) = [line for line in out.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: reference cache {cache} cannot be read (")
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()  # set-up failed: no empty checkpoint.save
