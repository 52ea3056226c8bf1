#!/usr/bin/env python
"""Compare per-token log-probs of a Hugging Face model and one of our checkpoints.

    python tools/verify_conversion.py --hf-dir /hf/Llama-3.1-8B-Instruct \
        --megatron-dir /ckpt/llama3.1-8b-megatron [--prompts-file prompts.txt] [--tolerance 1e-4]

Both sides run in fp32 on CPU (our side single-process, TP=PP=1); prints the max absolute and
relative difference and exits 1 above --tolerance.
"""

import argparse
import sys

from megatron_solopo.convert import verify


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--prompts-file", default=None, help="one prompt per line")
    parser.add_argument("--tokenizer-dir", default=None, help="default: --hf-dir")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max absolute log-prob difference allowed")
    args = parser.parse_args(argv)
    try:
        from megatron_solopo.training.checkpoint import read_run_config

        vocab = read_run_config(args.megatron_dir)["model"]["vocab_size"]
        prompts = verify.DEFAULT_PROMPTS
        if args.prompts_file:
            with open(args.prompts_file) as handle:
                prompts = [line.rstrip("\n") for line in handle if line.strip()]
        sequences = verify.tokenize_prompts(args.hf_dir, prompts, vocab, args.tokenizer_dir)
        result = verify.compare(verify.hf_logprobs(args.hf_dir, sequences),
                                verify.megatron_logprobs(args.megatron_dir, sequences))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"per-token log-probs, Hugging Face vs Megatron: {result}")
    if result.max_abs_diff > args.tolerance:
        print(f"FAILED: above tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
