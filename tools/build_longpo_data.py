#!/usr/bin/env python
"""Build LongPO training records with the model itself (docs/data_construction.md).

    python tools/build_longpo_data.py --input docs.jsonl --output data/longpo.jsonl \\
        --backend vllm --model /ckpt/Mistral-7B-Instruct-v0.2 --tensor-parallel-size 8 \\
        --min-doc-tokens 65536 --max-doc-tokens 131072 \\
        --long-rope-theta 1e7 --long-max-model-len 131072 --gpu-memory-utilization 0.45

Long documents -> chunks -> questions from each chunk -> chosen (answer given the chunk) and
rejected (answer given the whole document) -> filters -> multi-turn records that
tools/preprocess_data.py takes. Running the same command again resumes an interrupted run.
"""

import argparse
import dataclasses
import sys

from megatron_solopo.construct import cli
from megatron_solopo.construct.longpo import LongPOPipeline, LongPOSettings
from megatron_solopo.construct.text import Templates
from megatron_solopo.generation import SamplingParams, build_generator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(parser, temperature=1.0, top_p=1.0, max_new_tokens=1024, block_size=16)
    group = parser.add_argument_group("documents and chunks")
    group.add_argument("--text-field", default="text", help="JSONL/parquet field of the text")
    group.add_argument("--id-field", default="id",
                       help="field of the document id (default: <file name>:<line>)")
    group.add_argument("--min-doc-tokens", type=int, default=0,
                       help="drop shorter documents (paper: 65536)")
    group.add_argument("--max-doc-tokens", type=int, default=None,
                       help="drop longer documents (paper: the target length)")
    group.add_argument("--chunk-min-tokens", type=int, default=16384,
                       help="smallest chunk kept (default: %(default)s, as the official code)")
    group.add_argument("--chunk-max-tokens", type=int, default=30000,
                       help="largest chunk (default: %(default)s, as the official code)")
    group.add_argument("--min-chunks", type=int, default=2,
                       help="drop documents with fewer kept chunks (default: %(default)s)")
    group.add_argument("--split-rule", default="auto",
                       help="paragraphs: auto, blank-lines, latex-sections or regex:PATTERN "
                            "(default: %(default)s)")
    group = parser.add_argument_group("questions and turns")
    group.add_argument("--num-questions", type=int, default=4,
                       help="questions asked per chunk; exactly this many must parse "
                            "(default: %(default)s)")
    group.add_argument("--question-temperature", type=float, default=0.7)
    group.add_argument("--question-top-p", type=float, default=0.9)
    group.add_argument("--question-max-new-tokens", type=int, default=1024)
    group.add_argument("--max-turns", type=int, default=2,
                       help="questions kept per document (turns of its record; default: "
                            "%(default)s)")
    group = parser.add_argument_group(
        "rejected answers (whole document)",
        "Model settings for the long prompts only (the official code raises RoPE theta before "
        "generating the rejected answers); any of them loads a second model for that stage")
    group.add_argument("--long-rope-theta", type=float, default=None)
    group.add_argument("--long-rope-scaling", default=None, metavar="JSON")
    group.add_argument("--long-max-model-len", type=int, default=None)
    return parser


def long_generator(args):
    """``(factory, settings)`` of the rejected stage's generator, or ``(None, None)``."""
    if args.long_rope_theta is None and args.long_rope_scaling is None and \
            args.long_max_model_len is None:
        return None, None
    config = cli.generator_config(args)
    rope_scaling = config.rope_scaling
    if args.long_rope_scaling:
        rope_scaling = cli.parse_rope_scaling(args.long_rope_scaling, "--long-rope-scaling")
    config = dataclasses.replace(
        config, rope_theta=args.long_rope_theta if args.long_rope_theta is not None
        else config.rope_theta, rope_scaling=rope_scaling,
        max_model_len=args.long_max_model_len or config.max_model_len)
    return (lambda: build_generator(config)), cli.output_settings(config)


def build_pipeline(args) -> LongPOPipeline:
    settings = LongPOSettings(
        min_doc_tokens=args.min_doc_tokens, max_doc_tokens=args.max_doc_tokens,
        chunk_min_tokens=args.chunk_min_tokens, chunk_max_tokens=args.chunk_max_tokens,
        min_chunks=args.min_chunks, split_rule=args.split_rule, num_questions=args.num_questions,
        max_turns=args.max_turns,
        question_sampling=SamplingParams(args.question_temperature, args.question_top_p,
                                         args.question_max_new_tokens),
        answer_sampling=SamplingParams(args.temperature, args.top_p, args.max_new_tokens),
        seed=args.seed)
    factory, long_settings = long_generator(args)
    return LongPOPipeline(args.input, settings, Templates(args.templates), args.text_field,
                          args.id_field, long_generator_factory=factory,
                          long_generation=long_settings)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(build_pipeline, args)


if __name__ == "__main__":
    sys.exit(main())
