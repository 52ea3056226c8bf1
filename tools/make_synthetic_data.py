#!/usr/bin/env python
"""Synthetic long-context preference records (docs/data.md "Synthetic tasks"), no downloads.

    python tools/make_synthetic_data.py --task multidoc_qa --num-records 2000 \\
        --long-length 16000 --output data/mdqa.jsonl --tokenizer-dir data/tok

--long-length is in words, or in tokens of --tokenizer-model with --length-unit tokens.
--tokenizer-dir also trains a tiny SentencePiece tokenizer on the tasks' vocabulary there
(<dir>/tokenizer.model), and --hf-tokenizer-dir a tiny Hugging Face one.
"""

import argparse
import sys

from megatron_solopo.data import synthetic
from megatron_solopo.data.tokenizers import TOKENIZER_TYPES, build_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=synthetic.TASKS, required=True)
    parser.add_argument("--num-records", type=int, required=True)
    parser.add_argument("--long-length", type=int, default=1000,
                        help="length of each long context (default: %(default)s)")
    parser.add_argument("--length-unit", choices=("words", "tokens"), default="words",
                        help="tokens: measured with --tokenizer-type/--tokenizer-model")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="SentencePieceTokenizer")
    parser.add_argument("--tokenizer-model", default=None,
                        help="for --length-unit tokens (default: the one --tokenizer-dir trains)")
    parser.add_argument("--num-turns", type=int, default=1,
                        help="questions per long context (LongPO multi-turn records when > 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="also train a tiny SentencePiece tokenizer here")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--hf-tokenizer-dir", default=None,
                        help="also write a tiny Hugging Face tokenizer (with a chat template) here")
    args = parser.parse_args(argv)
    try:
        if args.num_records < 1:
            raise ValueError(f"--num-records must be >= 1, got {args.num_records}")
        _check_output(args.output)
        sp_model = (synthetic.train_sentencepiece_tokenizer(args.tokenizer_dir, args.vocab_size)
                    if args.tokenizer_dir else None)
        if sp_model:
            print(f"wrote tokenizer {sp_model}")
        if args.hf_tokenizer_dir:
            synthetic.make_hf_tokenizer(args.hf_tokenizer_dir)
            print(f"wrote tokenizer {args.hf_tokenizer_dir}")
        long_length = args.long_length
        if args.length_unit == "tokens":
            model = args.tokenizer_model or sp_model
            if not model:
                raise ValueError("--length-unit tokens needs --tokenizer-model (or --tokenizer-dir)")
            tokenizer = build_tokenizer(args.tokenizer_type if args.tokenizer_model else
                                        "SentencePieceTokenizer", model)
            long_length = synthetic.words_for_tokens(args.task, args.long_length, tokenizer)
            print(f"{args.long_length} tokens of {tokenizer.name} ~ {long_length} words")
        records = synthetic.generate_records(args.task, args.num_records, seed=args.seed,
                                             long_length=long_length, num_turns=args.num_turns)
        shortest = min(len(record["long_context"].split()) for record in records)
        if shortest > 2 * long_length:
            raise ValueError(f"--long-length {args.long_length}: {args.task} cannot make long "
                             f"contexts that short (the shortest it made has {shortest} words: the "
                             f"relevant documents plus distractors); use at least {shortest} words")
        synthetic.write_jsonl(records, args.output)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --output {args.output}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} {args.task} records to {args.output}")
    return 0


def _check_output(output: str) -> None:
    """--output can be written (checked before any work)."""
    from pathlib import Path

    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {output} is a directory; give a file name such as "
                         f"{output.rstrip('/')}/train.jsonl")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--output {output}: {ancestor} is a file, not a directory")


if __name__ == "__main__":
    sys.exit(main())
