#!/usr/bin/env python
"""Preprocessing throughput: N synthetic multi-document QA records whose long contexts are about
--long-tokens tokens, through tools/preprocess_data.py's library with a progress bar.

    python benchmarks/preprocess_throughput.py --num-records 2000 --long-tokens 16384 --workers 2

Prints the preprocess summary (tokens/s) and one JSON line to paste into benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import platform
import tempfile
import time

from megatron_solopo.data import synthetic
from megatron_solopo.data.preprocess import preprocess
from megatron_solopo.data.tokenizers import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-records", type=int, default=2000)
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="preprocess-bench-")
    tokenizer_model = synthetic.train_sentencepiece_tokenizer(os.path.join(workdir, "tok"), 256)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    # Calibrate words -> tokens on a sample so long contexts land near --long-tokens.
    sample = synthetic.generate_records("multidoc_qa", 4, seed=99, long_length=2000)
    ratio = sum(len(tokenizer.processor.encode(r["long_context"])) for r in sample) / (4 * 2000)
    words = int(args.long_tokens / ratio)
    start = time.perf_counter()
    records = synthetic.generate_records("multidoc_qa", args.num_records, seed=0, long_length=words)
    path = os.path.join(workdir, "records.jsonl")
    synthetic.write_jsonl(records, path)
    generated = time.perf_counter() - start
    summary = preprocess([path], os.path.join(workdir, "ds"), "SentencePieceTokenizer",
                         tokenizer_model, workers=args.workers, progress=True)
    print(f"done: {summary}")
    with open(os.path.join(workdir, "ds.json")) as handle:
        sidecar = json.load(handle)
    print(json.dumps({
        "records": summary.records_written, "tokens": summary.num_tokens,
        "max_long_tokens": sidecar["max_length"].get("long"),
        "long_histogram": sidecar["length_histogram"]["long"],
        "workers": args.workers, "seconds": round(summary.seconds, 1),
        "tokens_per_second": round(summary.tokens_per_second), "generation_seconds": round(generated, 1),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"}))


if __name__ == "__main__":
    main()
