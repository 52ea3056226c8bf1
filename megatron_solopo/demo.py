"""``make demo``: a small SoLoPO training on CPU, end to end.

1. a SentencePiece tokenizer trained on generated text and synthetic key-value retrieval records
   (the short context holds the relevant pairs, the long one hides them among distractors);
2. ``tools/preprocess_data.py``'s library: validate, tokenize, write ``.bin/.idx/.json``;
3. a randomly initialized tiny Llama-style model saved as the starting (and reference) checkpoint;
4. reference log-probs precomputed with it (2 gloo ranks, ``torchrun``);
5. SoLoPO (DPO base + SoLo-RA) for a few dozen steps (2 gloo ranks, TP=2 by default), printing
   Megatron's log line, then a summary: loss and reward accuracy at the start and the end.

Everything happens under ``--workdir`` (default ``runs/demo``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "examples" / "demo_solopo_cpu.yaml"


def _run(command: list[str], env: dict) -> None:
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"demo step failed (exit {result.returncode}): {' '.join(command)}")


def prepare_data(workdir: Path, num_train: int, num_valid: int, seed: int) -> dict:
    """Tokenizer, synthetic records and preprocessed datasets; returns their paths."""
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess

    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_model = synthetic.train_sentencepiece_tokenizer(str(data_dir / "tokenizer"),
                                                              vocab_size=256)
    paths = {"tokenizer_model": str(tokenizer_model)}
    for split, count, split_seed in (("train", num_train, seed), ("valid", num_valid, seed + 1)):
        jsonl = data_dir / f"{split}.jsonl"
        records = synthetic.generate_records("kv_retrieval", count, seed=split_seed,
                                             long_length=400)
        synthetic.write_jsonl(records, str(jsonl))
        prefix = data_dir / split
        preprocess(inputs=[str(jsonl)], output_prefix=str(prefix),
                   tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tokenizer_model),
                   workers=1)
        paths[split] = str(prefix)
    return paths


def summarize(metrics_file: Path) -> dict:
    """First and last training values, last evaluation; what the e2e test asserts on."""
    train = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [row for row in train if "train/loss" in row]
    evals = [row for row in train if any(key.startswith("eval/") for key in row)]
    accuracy_key = next((key for key in steps[-1] if key.endswith("rewards/accuracies")), None)
    tail = steps[-5:]
    summary = {
        "iterations": steps[-1]["iteration"],
        "first_loss": steps[0]["train/loss"],
        "final_loss": sum(row["train/loss"] for row in tail) / len(tail),
        "accuracy_key": accuracy_key,
        "final_train_accuracy": (sum(row[accuracy_key] for row in tail) / len(tail)
                                 if accuracy_key else None),
    }
    if evals:
        summary["eval"] = {key: value for key, value in evals[-1].items() if key.startswith("eval/")}
    return summary


DEMO_MARKER = ".megatron-solopo-demo"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"),
                        help="where data, checkpoints and logs go (default: runs/demo); a previous "
                             "demo's directory is replaced, any other non-empty one is refused")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (TP = nproc)")
    parser.add_argument("--train-iters", type=int, default=None,
                        help="training steps (default: the demo config's 30; at least 5)")
    parser.add_argument("--num-train", type=int, default=320, help="synthetic training records")
    parser.add_argument("--num-valid", type=int, default=32, help="synthetic validation records")
    parser.add_argument("--seed", type=int, default=1234, help="data seed")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value for training")
    args = parser.parse_args(argv)

    if args.train_iters is not None and args.train_iters < 5:
        parser.error(f"--train-iters {args.train_iters}: at least 5 (the demo warms up for 3)")
    started = time.time()
    workdir = Path(args.workdir).resolve()
    marker = workdir / DEMO_MARKER
    if workdir.exists() and any(workdir.iterdir()):
        # (older demos left no marker: recognize their layout)
        earlier_demo = (workdir / "init").is_dir() and (workdir / "checkpoints").is_dir()
        if not (marker.exists() or earlier_demo):
            parser.error(f"--workdir {workdir} is not empty and is not a previous demo's "
                         f"directory (no {DEMO_MARKER}); choose another")
        print(f"[demo] replacing the previous demo in {workdir}", flush=True)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by python -m megatron_solopo.demo; replaced by its next run\n")
    print(f"[demo] work directory: {workdir}", flush=True)
    paths = prepare_data(workdir, args.num_train, args.num_valid, args.seed)

    metrics_file = workdir / "metrics.jsonl"
    overrides = [
        f"data.train_prefix={paths['train']}",
        f"data.valid_prefix={paths['valid']}",
        f"tokenizer.tokenizer_model={paths['tokenizer_model']}",
        f"checkpoint.load={workdir / 'init'}",
        f"checkpoint.save={workdir / 'checkpoints'}",
        f"logging.metrics_jsonl={metrics_file}",
        f"logging.tensorboard_dir={workdir / 'tensorboard'}",
        "training.eval_interval=10",
        "training.eval_iters=1",
        f"parallel.tensor_model_parallel_size={args.nproc if args.nproc > 1 else 1}",
    ]
    if args.train_iters is not None:
        overrides.append(f"training.train_iters={args.train_iters}")
    overrides += args.overrides
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    python = sys.executable
    _run([python, "tools/init_checkpoint.py", "--config", str(DEMO_CONFIG), "--output",
          str(workdir / "init"), *overrides, "parallel.tensor_model_parallel_size=1"], env)
    torchrun = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                "--master-port", str(29600 + os.getpid() % 1000)]
    _run(torchrun + ["tools/precompute_reference.py", "--config", str(DEMO_CONFIG), *overrides], env)
    _run(torchrun + ["-m", "megatron_solopo.train", "--config", str(DEMO_CONFIG), *overrides], env)

    summary = summarize(metrics_file)
    summary["elapsed_seconds"] = round(time.time() - started, 1)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] summary")
    print(f"  iterations:           {summary['iterations']}")
    print(f"  SoLoPO loss:          {summary['first_loss']:.4f} (first step) -> "
          f"{summary['final_loss']:.4f} (mean of last 5)")
    if summary["final_train_accuracy"] is not None:
        print(f"  reward accuracy:      {summary['final_train_accuracy']:.3f} "
              f"({summary['accuracy_key']}, mean of last 5 steps)")
    for key, value in sorted(summary.get("eval", {}).items()):
        print(f"  {key:<30s} {value:.4f}")
    print(f"  elapsed:              {summary['elapsed_seconds']} s")
    print(f"  checkpoints:          {workdir / 'checkpoints'}")
    print(what_next(workdir))
    return 0


def what_next(workdir: Path) -> str:
    """The demo's last lines: where to go from here, with commands that work as printed."""
    return "\n".join([
        "",
        "[demo] what next",
        f"  metrics per step:     {workdir / 'metrics.jsonl'} (TensorBoard: "
        f"tensorboard --logdir {workdir / 'tensorboard'})",
        f"  export to HF:         python tools/convert_checkpoint.py megatron-to-hf "
        f"--megatron-dir {workdir / 'checkpoints'} --output {workdir / 'hf'}",
        "  your own model:       README.md, 'Workflow: convert, train, convert back'; on one CPU "
        "or GPU: examples/solopo_converted_single.yaml",
        "  other objectives:     docs/objectives.md (e.g. python -m megatron_solopo.demo "
        "objective.alpha=0 for plain DPO on the short context)",
    ])


if __name__ == "__main__":
    sys.exit(main())
