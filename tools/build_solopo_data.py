#!/usr/bin/env python
"""Build SoLoPO training pairs with the model itself (docs/data_construction.md).

    python tools/build_solopo_data.py --input musique_ans_v1.0_train.jsonl \\
        --output data/solopo.jsonl --backend vllm --model /ckpt/Qwen2.5-7B-Instruct \\
        --format musique --long-length 7500 --num-samples 32

QA records with marked evidence -> short context (the evidence) and long context (the evidence
among distractors) -> answers sampled on the short context, scored by sub-EM -> chosen (correct)
and rejected (incorrect) -> records that tools/preprocess_data.py takes. Running the same command
again resumes an interrupted run.
"""

import argparse
import sys

from megatron_solopo.construct import cli
from megatron_solopo.construct.qa_formats import QA_FORMATS
from megatron_solopo.construct.solopo import SoLoPOPipeline, SoLoPOSettings
from megatron_solopo.construct.text import Templates
from megatron_solopo.generation import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(parser, temperature=0.85, top_p=1.0, max_new_tokens=1024, block_size=64)
    group = parser.add_argument_group("contexts")
    group.add_argument("--format", choices=QA_FORMATS, default="musique",
                       help="input layout (default: %(default)s)")
    group.add_argument("--long-length", type=int, default=None,
                       help="long context size in tokens: the evidence among distractors from "
                            "the record and other records (paper: about 7500); default: the "
                            "record's own paragraphs")
    group.add_argument("--short-distractors", type=int, default=0,
                       help="distractor paragraphs also in the short context (default: 0)")
    group = parser.add_argument_group("samples and scoring")
    group.add_argument("--num-samples", type=int, default=32,
                       help="answers sampled per short context (default: %(default)s)")
    group.add_argument("--long-samples", type=int, default=0,
                       help="also sample this many on the long context, for the Long-DPO "
                            "baseline's pair in meta.long_pair (default: 0)")
    group.add_argument("--score", default="sub_em",
                       help="sub_em, f1, exact_match, or module:function(prediction, golds) "
                            "(default: %(default)s)")
    group.add_argument("--score-threshold", type=float, default=None,
                       help="a sample is correct when its score reaches this (default: 1.0; 0.5 "
                            "for f1 and custom functions)")
    group.add_argument("--answer-prefix", default="Answer:",
                       help="score the text after the last occurrence of this (the whole answer "
                            "without it; '' to always score the whole answer)")
    return parser


def build_pipeline(args) -> SoLoPOPipeline:
    threshold = args.score_threshold
    if threshold is None:
        threshold = 1.0 if args.score in ("sub_em", "exact_match") else 0.5
    settings = SoLoPOSettings(
        long_length=args.long_length, short_distractors=args.short_distractors,
        sampling=SamplingParams(args.temperature, args.top_p, args.max_new_tokens,
                                args.num_samples),
        long_samples=args.long_samples, score=args.score, score_threshold=threshold,
        answer_prefix=args.answer_prefix or None, seed=args.seed)
    return SoLoPOPipeline(args.input, settings, Templates(args.templates), args.format)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(build_pipeline, args)


if __name__ == "__main__":
    sys.exit(main())
