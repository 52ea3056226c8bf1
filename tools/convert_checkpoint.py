#!/usr/bin/env python
"""Hugging Face <-> Megatron checkpoints (Llama, Qwen2, Qwen3, Mistral). docs/conversion.md.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir /hf/Llama-3.1-8B-Instruct \
        --output /ckpt/llama3.1-8b-megatron --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir /ckpt/solopo-run \
        --output /hf/solopo-llama3.1-8b --max-shard-size 5GB
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron",
                                      help="HF safetensors -> Megatron release checkpoint")
    to_megatron.add_argument("--hf-dir", required=True, help="HF model directory (config.json, "
                             "*.safetensors, tokenizer files)")
    to_megatron.add_argument("--output", required=True, help="new directory (must not exist or "
                             "be empty)")
    to_megatron.add_argument("--tensor-model-parallel-size", type=int, default=1,
                             help="the TP the checkpoint will mostly be used with: validated and "
                                  "decides the vocabulary padding (it loads under any layout)")
    to_megatron.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                             help="validated against the number of layers and recorded")
    to_hf = commands.add_parser("megatron-to-hf", help="any of our checkpoints -> HF safetensors")
    to_hf.add_argument("--megatron-dir", required=True,
                       help="a save directory (its latest checkpoint) or an iter_*/release directory")
    to_hf.add_argument("--output", required=True, help="new directory (must not exist or be empty)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. "
                       "5GB, 500MB (default 5GB)")
    to_hf.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="cast the weights (default: the checkpoint's own dtype)")
    to_hf.add_argument("--tokenizer-dir", default=None,
                       help="tokenizer files to copy (default: the run's recorded tokenizer, else "
                            "the tokenizer/ directory beside a converted checkpoint)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_solopo.convert import hf_to_megatron, megatron_to_hf
    from megatron_solopo.convert.hf_to_megatron import describe

    try:
        if args.command == "hf-to-megatron":
            path = hf_to_megatron(args.hf_dir, args.output,
                                  tensor_model_parallel_size=args.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_model_parallel_size)
            print(describe(path))
        else:
            path = megatron_to_hf(args.megatron_dir, args.output, max_shard_size=args.max_shard_size,
                                  dtype=args.dtype, tokenizer_dir=args.tokenizer_dir)
            print(f"wrote {path}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
