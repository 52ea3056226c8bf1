#!/usr/bin/env python
"""Peak memory of checkpoint conversion relative to the model's size.

    python benchmarks/conversion_memory.py --layers 8 --hidden 2048 --workdir /tmp/convmem

Builds a random Llama-style HF checkpoint (bf16, sharded safetensors), then runs
``tools/convert_checkpoint.py hf-to-megatron`` and ``megatron-to-hf`` as separate processes and
samples their memory every 20 ms from /proc (the process and all its children): peak anonymous
memory (what the conversion allocates), peak file-backed resident pages (memory-mapped inputs:
page cache, reclaimable) and their sum. A bare interpreter importing the same libraries is
measured the same way as the baseline. Prints a table row per step and one JSON line.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_model(directory: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=max(1, hidden // 512), vocab_size=32000,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.save_pretrained(directory, max_shard_size="2GB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return size


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            pids.append(child)
            frontier.append(child)
    return pids


def _rss_kib(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                file += int(line.split()[1])
    except OSError:
        pass
    return anon, file


def measure(command: list[str]) -> dict:
    """Run ``command``; peak anonymous / file-backed / total RSS over its process tree (GiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak_anon = peak_file = peak_total = 0
    while process.poll() is None:
        samples = [_rss_kib(pid) for pid in _tree(process.pid)]
        anon, file = sum(s[0] for s in samples), sum(s[1] for s in samples)
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        peak_total = max(peak_total, anon + file)
        time.sleep(0.02)
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    gib = 1 << 20
    return {"seconds": round(time.perf_counter() - start, 1), "peak_anon_gib": round(peak_anon / gib, 2),
            "peak_file_gib": round(peak_file / gib, 2), "peak_total_gib": round(peak_total / gib, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=8,
                        help="decides the vocabulary padding of the converted checkpoint")
    parser.add_argument("--workdir", default="/tmp/conversion-memory")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    size = make_model(workdir / "hf", args.layers, args.hidden)
    model_gib = size / (1 << 30)
    python = sys.executable
    steps = {
        "interpreter + libraries": [python, "-c", "import megatron_solopo, megatron.core, "
                                    "transformers, safetensors, torch"],
        "hf-to-megatron": [python, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir",
                           str(workdir / "hf"), "--output", str(workdir / "megatron"),
                           "--tensor-model-parallel-size", str(args.tensor_model_parallel_size)],
        "megatron-to-hf": [python, "tools/convert_checkpoint.py", "megatron-to-hf",
                           "--megatron-dir", str(workdir / "megatron"), "--output",
                           str(workdir / "hf_back"), "--max-shard-size", "5GB"],
    }
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB")
    print(f"model: {args.layers} layers, hidden {args.hidden}, bf16, {model_gib:.2f} GiB; {machine}")
    print("| step | seconds | peak anonymous | peak file-backed (mmap) | peak total | total / model "
          "| (total - baseline) / model |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, command in steps.items():
        result = measure(command)
        baseline = results.get("interpreter + libraries", {}).get("peak_total_gib", 0.0)
        results[name] = dict(result, ratio=round(result["peak_total_gib"] / model_gib, 2),
                             ratio_over_baseline=round((result["peak_total_gib"] - baseline)
                                                       / model_gib, 2))
        ratios = ("| |" if name.startswith("interpreter") else
                  f"| {results[name]['ratio']}x | {results[name]['ratio_over_baseline']}x |")
        print(f"| {name} | {result['seconds']} | {result['peak_anon_gib']} GiB | "
              f"{result['peak_file_gib']} GiB | {result['peak_total_gib']} GiB {ratios}", flush=True)
    print(json.dumps({"model_gib": round(model_gib, 2), "layers": args.layers,
                      "hidden": args.hidden, "machine": machine, "steps": results}))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
