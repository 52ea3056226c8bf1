#!/usr/bin/env python
"""Preprocessing throughput: N synthetic multi-document QA records whose long contexts are about
--long-tokens tokens, through tools/preprocess_data.py's library (progress bar on).

    python benchmarks/preprocess_throughput.py --num-records 2000 --long-tokens 16384 --workers 1 2

For each --workers value: prints the preprocess summary (records, tokens, tokens/s) and one JSON
line for benchmarks/RESULTS.md. Tokens counted are the tokens written: every record holds 4
sequences (short/long x chosen/rejected); the long prompt is tokenized once per record and
shared by its two long sequences.
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

from megatron_solopo.data import synthetic
from megatron_solopo.data.preprocess import preprocess
from megatron_solopo.data.tokenizers import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-records", type=int, default=2000)
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                        choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="preprocess-bench-")
    try:
        if args.tokenizer_type == "SentencePieceTokenizer":
            model = synthetic.train_sentencepiece_tokenizer(os.path.join(workdir, "tok"), 256)
        else:
            model = synthetic.make_hf_tokenizer(os.path.join(workdir, "tok"))
        tokenizer = build_tokenizer(args.tokenizer_type, model)
        words = synthetic.words_for_tokens("multidoc_qa", args.long_tokens, tokenizer)
        start = time.perf_counter()
        records = synthetic.generate_records("multidoc_qa", args.num_records, seed=0,
                                             long_length=words)
        path = os.path.join(workdir, "records.jsonl")
        synthetic.write_jsonl(records, path)
        del records
        generated = time.perf_counter() - start
        print(f"generated {args.num_records} records ({os.path.getsize(path) / 2**20:.0f} MiB) in "
              f"{generated:.1f} s")
        for workers in args.workers:
            prefix = os.path.join(workdir, f"ds-w{workers}")
            summary = preprocess([path], prefix, args.tokenizer_type, model, workers=workers,
                                 progress=True)
            print(f"done: {summary}")
            with open(prefix + ".json") as handle:
                sidecar = json.load(handle)
            print(json.dumps({
                "records": summary.records_written, "tokens": summary.num_tokens,
                "max_long_tokens": sidecar["max_length"]["long"],
                "mean_long_tokens": sidecar["mean_length"]["long"],
                "tokenizer": args.tokenizer_type, "workers": workers,
                "seconds": round(summary.seconds, 1),
                "tokens_per_second": round(summary.tokens_per_second),
                "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"}))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
