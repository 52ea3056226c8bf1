#!/usr/bin/env python
"""Synthetic long-context preference records (docs/data.md "Synthetic tasks"), no downloads.

    python tools/make_synthetic_data.py --task multidoc_qa --num-records 2000 \
        --long-length 16000 --output data/mdqa.jsonl [--tokenizer-dir data/tok]

--tokenizer-dir also trains a tiny SentencePiece tokenizer on the tasks' vocabulary there.
"""

import argparse
import sys

from megatron_solopo.data import synthetic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=synthetic.TASKS, required=True)
    parser.add_argument("--num-records", type=int, required=True)
    parser.add_argument("--long-length", type=int, default=1000,
                        help="words in each long context (~tokens with the tiny tokenizers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="also train a SentencePiece tokenizer here")
    parser.add_argument("--vocab-size", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        records = synthetic.generate_records(args.task, args.num_records, seed=args.seed,
                                             long_length=args.long_length)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    synthetic.write_jsonl(records, args.output)
    print(f"wrote {len(records)} {args.task} records to {args.output}")
    if args.tokenizer_dir:
        model = synthetic.train_sentencepiece_tokenizer(args.tokenizer_dir, args.vocab_size)
        print(f"wrote tokenizer {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
