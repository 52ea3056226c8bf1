#!/usr/bin/env python
"""Peak memory of checkpoint conversion relative to the model's size.

    python benchmarks/conversion_memory.py --layers 8 --hidden 2048 --workdir /tmp/convmem

Builds a random Llama-style HF checkpoint (bf16, sharded safetensors) in one process, then runs
hf-to-megatron and megatron-to-hf each in a fresh process and reports their peak RSS growth over
the interpreter + library baseline, next to the checkpoint size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def make_model(workdir: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         vocab_size=32000, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.save_pretrained(workdir / "hf", max_shard_size="500MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(step: str, workdir: Path) -> None:
    import megatron_solopo  # noqa: F401
    from megatron_solopo.convert.checkpoints import hf_to_megatron, megatron_to_hf

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if step == "hf-to-megatron":
        hf_to_megatron(str(workdir / "hf"), str(workdir / "megatron"))
    else:
        megatron_to_hf(str(workdir / "megatron"), str(workdir / "hf_back"), max_shard_size="500MB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step": step, "peak_rss_growth_mib": round((peak - baseline) / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--workdir", default="/tmp/conversion-memory")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.step:
        run(args.step, workdir)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    size = make_model(workdir, args.layers, args.hidden)
    print(json.dumps({"model_bytes_mib": round(size / 2**20), "dtype": "bfloat16",
                      "machine": f"{os.cpu_count()}-core CPU, no GPU"}))
    for step in ("hf-to-megatron", "megatron-to-hf"):
        subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--step", step], check=True)


if __name__ == "__main__":
    main()
