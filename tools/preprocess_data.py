#!/usr/bin/env python
"""Tokenize JSONL preference records into a Megatron indexed dataset (docs/data.md).

    python tools/preprocess_data.py --input train.jsonl --output-prefix data/train \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /ckpt/llama3/tokenizer \
        --workers 8 --max-long-length 131072 --max-short-length 8192

Every line is validated first; by default a single bad line stops the run before anything is
written, and all bad lines (up to --max-errors) are reported with file, line, record id and field.
"""

import argparse
import sys

from megatron_solopo.data.preprocess import OVERLONG_POLICIES, preprocess
from megatron_solopo.data.tokenizers import TOKENIZER_TYPES
from megatron_solopo.roles import Role


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>.bin/.idx, <prefix>.mask.bin/.idx and <prefix>.json")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", required=True,
                        help="HF tokenizer directory, or SentencePiece .model file")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--max-long-length", type=int, default=None,
                        help="tokens per long-context sequence (prompt + response)")
    parser.add_argument("--max-short-length", type=int, default=None,
                        help="tokens per short-context sequence (prompt + response)")
    parser.add_argument("--overlong", choices=OVERLONG_POLICIES, default="truncate-middle",
                        help="sequences over the limit: cut the context's middle, its beginning, "
                             "or drop the record (the response is never cut)")
    parser.add_argument("--roles", nargs="+", default=None,
                        help="store only these roles (default: all the records have)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="write invalid lines to a rejects file and go on")
    parser.add_argument("--rejects-file", default=None,
                        help="default <output-prefix>.rejects.jsonl")
    parser.add_argument("--max-errors", type=int, default=20, help="errors reported in detail")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        roles = [Role.parse(name) for name in args.roles] if args.roles else None
        summary = preprocess(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            workers=args.workers, max_long_length=args.max_long_length,
            max_short_length=args.max_short_length, overlong=args.overlong,
            skip_invalid=args.skip_invalid, rejects_file=args.rejects_file,
            max_errors=args.max_errors, roles=roles, progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
