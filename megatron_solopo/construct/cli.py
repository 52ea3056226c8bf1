"""Flags shared by tools/build_longpo_data.py and tools/build_solopo_data.py, and the run."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_solopo.construct.runner import Runner, format_summary, log_stderr, shard_from_env
from megatron_solopo.generation import BACKENDS, GeneratorConfig, build_generator


def add_common_args(parser: argparse.ArgumentParser, *, temperature: float, top_p: float,
                    max_new_tokens: int, block_size: int) -> None:
    group = parser.add_argument_group("input and output")
    group.add_argument("--input", nargs="+", required=True, help="input file(s)")
    group.add_argument("--output", required=True,
                       help="the records (JSONL, what tools/preprocess_data.py --input takes); "
                            "the summary goes next to it (<output stem>.summary.json), work in "
                            "progress to <output>.work/ (running the same command resumes)")
    group.add_argument("--templates", default=None, metavar="DIR",
                       help="directory of prompt templates replacing the shipped ones of the same "
                            "file name (docs/data_construction.md)")
    group = parser.add_argument_group("model")
    group.add_argument("--backend", choices=BACKENDS, required=True)
    group.add_argument("--model", required=True,
                       help="Hugging Face model directory (hf, vllm) or served model name (openai)")
    group.add_argument("--tokenizer", default=None,
                       help="Hugging Face tokenizer directory (default: --model; required with "
                            "openai, to count tokens)")
    group.add_argument("--base-url", default=None, help="openai: e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--api-key", default=None, help="openai (default: $OPENAI_API_KEY)")
    group.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    group.add_argument("--device", default="auto", help="hf: cpu, cuda, cuda:N or auto")
    group.add_argument("--batch-size", type=int, default=8, help="hf: prompts per batch")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + answer in tokens (vllm; hf raises the model's "
                            "max_position_embeddings to it)")
    group.add_argument("--rope-theta", type=float, default=None,
                       help="override the model's RoPE base for long prompts (hf, vllm)")
    group.add_argument("--rope-scaling", default=None, metavar="JSON",
                       help="override RoPE scaling, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0}'")
    group.add_argument("--concurrency", type=int, default=16, help="openai: requests in flight")
    group.add_argument("--max-retries", type=int, default=5, help="openai")
    group.add_argument("--request-timeout", type=float, default=600.0, help="openai: seconds")
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=temperature,
                       help="answers (default: %(default)s; 0: greedy)")
    group.add_argument("--top-p", type=float, default=top_p, help="answers (default: %(default)s)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help="tokens per answer (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0,
                       help="sampling and every random choice; same seed and inputs, same output")
    group = parser.add_argument_group("parallel runs")
    group.add_argument("--num-shards", type=int, default=None,
                       help="split the inputs across this many processes (default: torchrun's "
                            "WORLD_SIZE or Slurm's SLURM_NTASKS, else 1)")
    group.add_argument("--shard-index", type=int, default=None,
                       help="this process's shard (default: RANK or SLURM_PROCID, else 0)")
    group.add_argument("--block-size", type=int, default=block_size,
                       help="inputs per committed block: the unit of resuming and of batching "
                            "(default: %(default)s)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_rope_scaling(text: str, flag: str = "--rope-scaling") -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: not JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: should be a JSON object")
    return value


def generator_config(args) -> GeneratorConfig:
    rope_scaling = parse_rope_scaling(args.rope_scaling) if args.rope_scaling else None
    if args.backend == "openai" and not args.tokenizer:
        raise ValueError("--backend openai needs --tokenizer HF_DIR (the served model's "
                         "tokenizer) to count document and context tokens")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return GeneratorConfig(
        backend=args.backend, model=args.model, tokenizer=args.tokenizer, seed=args.seed,
        rope_theta=args.rope_theta, rope_scaling=rope_scaling, max_model_len=args.max_model_len,
        dtype=args.dtype, device=args.device, batch_size=args.batch_size,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization, base_url=args.base_url,
        api_key=args.api_key, concurrency=args.concurrency, max_retries=args.max_retries,
        request_timeout=args.request_timeout, progress=not args.no_progress)


def output_settings(config: GeneratorConfig) -> dict:
    """The generator settings the records depend on (not where the server is, how many requests
    are in flight or whether a bar is shown): a resumed run must have the same."""
    keys = ("backend", "model", "tokenizer", "seed", "rope_theta", "rope_scaling",
            "max_model_len", "dtype", "tensor_parallel_size")
    settings = {key: getattr(config, key) for key in keys}
    if config.backend == "hf":
        settings["batch_size"] = config.batch_size  # a batch shares one sampling generator
    return settings


def run(build_pipeline, args) -> int:
    """Build the pipeline (checks every input), run this shard, print the summary; user errors
    print ``error: ...`` and return 2."""
    try:
        config = generator_config(args)
        num_shards, shard_index = shard_from_env(args.num_shards, args.shard_index)
        pipeline = build_pipeline(args)
        runner = Runner(pipeline, args.output, num_shards=num_shards, shard_index=shard_index,
                        block_size=args.block_size, generation=output_settings(config),
                        log=log_stderr, progress=not args.no_progress)
        summary = runner.run(lambda: build_generator(config))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
