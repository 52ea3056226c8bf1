#!/usr/bin/env python
"""Compare per-token log-probs of a Hugging Face model and one of our checkpoints.

    python tools/verify_conversion.py --hf-dir /hf/Llama-3.1-8B-Instruct \
        --megatron-dir /ckpt/llama3.1-8b-megatron [--prompts-file prompts.txt] [--tolerance 1e-4]

Both sides run in fp32 on CPU, one after the other (ours single-process, TP=PP=1); prints the max
absolute and relative difference and exits 1 above --tolerance (2 on a usage error).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--megatron-dir", required=True,
                        help="a save directory (its latest checkpoint) or an iter_*/release directory")
    parser.add_argument("--prompts-file", default=None,
                        help="one prompt per line (default: three built-in prompts)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="default: --hf-dir; without tokenizer files, random token ids are used")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max-abs log-prob difference accepted (default 1e-4)")
    args = parser.parse_args(argv)
    from megatron_solopo.convert import verify

    from pathlib import Path

    try:
        if not (Path(args.hf_dir) / "config.json").is_file():
            raise ValueError(f"--hf-dir {args.hf_dir}: no Hugging Face model there (no "
                             f"config.json); give a local model directory")
        prompts = verify.DEFAULT_PROMPTS
        if args.prompts_file:
            if not Path(args.prompts_file).is_file():
                raise ValueError(f"--prompts-file {args.prompts_file} does not exist")
            with open(args.prompts_file) as handle:
                prompts = [line.rstrip("\n") for line in handle if line.strip()]
            if not prompts:
                raise ValueError(f"--prompts-file {args.prompts_file} has no prompts")
        result = verify.verify_conversion(args.hf_dir, args.megatron_dir, prompts, args.tokenizer_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"per-token log-probs, Hugging Face vs Megatron: {result}")
    if not result.max_abs_diff <= args.tolerance:  # NaN fails too
        print(f"FAIL: max abs diff {result.max_abs_diff:.3e} is above --tolerance "
              f"{args.tolerance:g}", file=sys.stderr)
        return 1
    print(f"PASS: max abs diff {result.max_abs_diff:.3e} <= --tolerance {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
