"""README's workflow with the real command lines, on a tiny random Llama (HF) on CPU: convert to
Megatron at TP=2, verify, make and preprocess records with the converted checkpoint's tokenizer,
precompute reference log-probs and train with ``torchrun`` from the shipped example config (only
the sizes and paths overridden), then convert the trained checkpoint back to Hugging Face."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "solopo_llama3_8b_64k_h100.yaml"


def run(*args, timeout=600):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-5000:]}"
    return result.stdout


def torchrun(*args):
    return run("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), *args)


def _free_port():
    from megatron_solopo.parallel.distributed import free_port

    return free_port()


def test_convert_train_convert_back(tmp_path):
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint

    hf_in = make_tiny_hf_checkpoint(tmp_path / "hf_in", "llama_gqa_untied",
                                    max_position_embeddings=4096)
    megatron = tmp_path / "megatron"
    run("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", hf_in, "--output", megatron,
        "--tensor-model-parallel-size", "2")
    assert (megatron / "tokenizer" / "tokenizer.json").exists()
    verified = run("tools/verify_conversion.py", "--hf-dir", hf_in, "--megatron-dir", megatron)
    assert "max" in verified

    data = tmp_path / "data"
    for split, count, seed in (("train", 32, 0), ("valid", 8, 1)):
        run("tools/make_synthetic_data.py", "--task", "multidoc_qa", "--num-records", count,
            "--seed", seed, "--long-length", "120", "--output", data / f"{split}.jsonl")
        summary = run("tools/preprocess_data.py", "--input", data / f"{split}.jsonl",
                      "--output-prefix", data / split, "--tokenizer-type", "HuggingFaceTokenizer",
                      "--tokenizer-model", megatron / "tokenizer", "--workers", "2",
                      "--max-long-length", "2048", "--no-progress")
        assert f"written {count}" in summary, summary

    run_dir = tmp_path / "run"
    overrides = [
        "parallel.context_parallel_size=1", "parallel.tensor_model_parallel_size=2",
        "precision.bf16=false", "precision.fp8=null",
        f"tokenizer.tokenizer_model={megatron / 'tokenizer'}",
        f"data.train_prefix={data / 'train'}", f"data.valid_prefix={data / 'valid'}",
        "data.max_tokens_per_micro_batch=4096",
        "training.train_iters=6", "training.global_batch_size=4", "training.eval_interval=3",
        "training.eval_iters=1", "optimizer.lr=1e-3", "scheduler.lr_warmup_fraction=null",
        "scheduler.lr_warmup_iters=1",
        f"checkpoint.load={megatron}", f"checkpoint.save={run_dir}", "checkpoint.save_interval=3",
        f"logging.tensorboard_dir={run_dir / 'tensorboard'}",
    ]
    torchrun("tools/precompute_reference.py", "--config", EXAMPLE, *overrides)
    log = torchrun("-m", "megatron_solopo.train", "--config", EXAMPLE, *overrides)
    assert " iteration        6/       6 |" in log, log[-3000:]
    assert "short/rewards/accuracies" in log and "solo_ra/gap" in log
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (run_dir / "iter_0000006" / "run_config.yaml").exists()

    hf_out = tmp_path / "hf_out"
    run("tools/convert_checkpoint.py", "megatron-to-hf", "--megatron-dir", run_dir,
        "--output", hf_out, "--max-shard-size", "5GB")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = AutoModelForCausalLM.from_pretrained(hf_in, dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(hf_out).vocab_size == \
        AutoTokenizer.from_pretrained(hf_in).vocab_size
    before, after = original.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "training changed almost nothing"
    assert json.loads((hf_out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
