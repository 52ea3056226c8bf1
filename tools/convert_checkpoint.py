#!/usr/bin/env python
"""Hugging Face <-> Megatron checkpoints (Llama, Qwen2, Mistral). docs/conversion.md.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir /hf/Llama-3.1-8B-Instruct \
        --output /ckpt/llama3.1-8b-megatron --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir /ckpt/solopo-run \
        --output /hf/solopo-llama3.1-8b --max-shard-size 5GB
"""

import argparse
import sys

from megatron_solopo.convert.checkpoints import hf_to_megatron, megatron_to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint")
    to_megatron.add_argument("--hf-dir", required=True)
    to_megatron.add_argument("--output", required=True, help="new directory (weights-only checkpoint)")
    to_megatron.add_argument("--tensor-model-parallel-size", type=int, default=1,
                             help="the TP the checkpoint will mostly be used with (vocab padding); "
                                  "it loads under any layout")
    to_megatron.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    to_hf = commands.add_parser("megatron-to-hf", help="any of our checkpoints -> HF safetensors")
    to_hf.add_argument("--megatron-dir", required=True,
                       help="a save directory (latest checkpoint) or an iter_*/release directory")
    to_hf.add_argument("--output", required=True, help="new directory")
    to_hf.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    to_hf.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: the source HF checkpoint's, else the run's precision")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            path = hf_to_megatron(args.hf_dir, args.output,
                                  tensor_model_parallel_size=args.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_model_parallel_size)
        else:
            path = megatron_to_hf(args.megatron_dir, args.output, max_shard_size=args.max_shard_size,
                                  dtype=args.dtype)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
