#!/usr/bin/env python
"""Tokenize JSONL preference records into a Megatron indexed dataset (docs/data.md).

    python tools/preprocess_data.py --input train.jsonl --output-prefix data/train \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /ckpt/llama3/tokenizer \\
        --workers 8 --max-long-length 131072 --max-short-length 8192

Every line is validated first; by default a single bad line stops the run before anything is
written, and all bad lines (up to --max-errors) are reported with file, line, record id and field.
Writes <prefix>.bin/.idx, <prefix>.spans.bin/.idx, <prefix>.ids and the sidecar <prefix>.json.
"""

import argparse
import sys

from megatron_solopo.data.encoding import OVERLONG_POLICIES
from megatron_solopo.data.preprocess import preprocess
from megatron_solopo.data.tokenizers import TOKENIZER_TYPES
from megatron_solopo.roles import ALL_ROLES, Role


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input and output")
    group.add_argument("--input", nargs="+", required=True, help="JSONL file(s) of records")
    group.add_argument("--output-prefix", required=True,
                       help="writes <prefix>.bin/.idx, <prefix>.spans.bin/.idx, <prefix>.ids and "
                            "<prefix>.json (atomically: temporary names, then renamed)")
    group.add_argument("--roles", nargs="+", default=None, metavar="ROLE",
                       help=f"store only these roles (default: every role a record has); "
                            f"choices: {' '.join(r.value for r in ALL_ROLES)}")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", required=True,
                       help="Hugging Face tokenizer directory, or SentencePiece .model file")
    group = parser.add_argument_group("lengths")
    group.add_argument("--max-long-length", type=int, default=None,
                       help="tokens per long-context sequence, prompt + response(s)")
    group.add_argument("--max-short-length", type=int, default=None,
                       help="tokens per short-context sequence, prompt + response(s)")
    group.add_argument("--overlong", choices=OVERLONG_POLICIES, default="truncate-middle",
                       help="a longer sequence: cut the middle of its context, or the beginning of "
                            "its context, or drop the record; responses are never cut "
                            "(default: %(default)s)")
    group = parser.add_argument_group("invalid records")
    group.add_argument("--skip-invalid", action="store_true",
                       help="write invalid lines to the rejects file and go on (default: stop "
                            "before writing anything)")
    group.add_argument("--rejects-file", default=None,
                       help="default <output-prefix>.rejects.jsonl")
    group.add_argument("--max-errors", type=int, default=20,
                       help="errors reported in detail (default: %(default)s)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=0,
                       help="also print a progress line every N records (for logs without a "
                            "terminal); 0: only the progress bar")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        roles = [Role.parse(name) for name in args.roles] if args.roles else None
        summary = preprocess(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            workers=args.workers, max_long_length=args.max_long_length,
            max_short_length=args.max_short_length, overlong=args.overlong,
            skip_invalid=args.skip_invalid, rejects_file=args.rejects_file,
            max_errors=args.max_errors, roles=roles, progress=not args.no_progress,
            log_interval=args.log_interval)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
