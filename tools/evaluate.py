#!/usr/bin/env python
"""Evaluate checkpoints: long-context task accuracy by context length, short-context retention,
preference metrics (docs/evaluation.md).

    python tools/evaluate.py --checkpoint sft=/ckpt/sft --checkpoint solopo=runs/solopo \\
        --synthetic kv_retrieval,needle --lengths 1,2,4,8 --num-examples 50 --output eval/

A checkpoint is a Hugging Face directory (config.json) or one of ours (a save directory,
``iter_*`` or ``release``; converted to Hugging Face under ``--output``). Answers are generated
greedily through a generation backend (``--backend hf`` by default), scored with sub-EM and F1,
and streamed to ``<output>/<name>/results.jsonl``: the same command started again resumes. Writes
``<output>/summary.json``, ``<output>/table.md`` and, with matplotlib installed,
``<output>/accuracy_vs_length.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a checkpoint to evaluate (repeat for several; NAME= is optional)")
    parser.add_argument("--output", required=True, help="results directory (resumes)")
    source = parser.add_argument_group("questions (one or both)")
    source.add_argument("--synthetic", default=None,
                        help="synthetic tasks, comma-separated: multidoc_qa, kv_retrieval, needle")
    source.add_argument("--lengths", default="1,2,4,8",
                        help="synthetic: multiples of the short length (1 = the short context)")
    source.add_argument("--num-examples", type=int, default=50,
                        help="synthetic: questions per task and length")
    source.add_argument("--seed", type=int, default=0, help="synthetic: question seed")
    source.add_argument("--jsonl", action="append", default=[],
                        help="JSONL file(s) with question, answer(s), context per line")
    source.add_argument("--context-field", default=None,
                        help="--jsonl: the context field (default: context, long_context, "
                             "short_context, the first present)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--backend", default="hf", help="hf (default), vllm or openai")
    generation.add_argument("--max-new-tokens", type=int, default=64)
    generation.add_argument("--batch-size", type=int, default=16, help="hf: prompts per batch")
    generation.add_argument("--device", default="auto", help="hf: cpu, cuda or auto")
    generation.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    generation.add_argument("--base-url", default=None, help="openai: the server's /v1 URL")
    generation.add_argument("--tokenizer", default=None, help="tokenizer directory (default: "
                                                               "the checkpoint's)")
    preference = parser.add_argument_group("preference metrics")
    preference.add_argument("--preference-data", default=None,
                            help="held-out preference records (JSONL, docs/data.md schema)")
    preference.add_argument("--reference", default=None,
                            help="reference checkpoint for DPO rewards (default: none, rewards "
                                 "are beta * summed log-probs)")
    preference.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--baseline", default=None,
                        help="NAME of the checkpoint the retention ratio compares with "
                             "(default: the first)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return parser, parser.parse_args(argv)


def parse_checkpoints(values) -> dict:
    checkpoints = {}
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        name = name or Path(path.rstrip("/")).name
        if not os.path.exists(path):
            raise ValueError(f"--checkpoint {value}: {path} does not exist")
        if name in checkpoints:
            raise ValueError(f"--checkpoint {value}: the name {name!r} is used twice; give "
                             f"NAME=PATH")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"--checkpoint {value}: the name {name!r} must be letters, digits, "
                             f"'-', '_' or '.'")
        checkpoints[name] = path
    return checkpoints


def as_hf(name: str, path: str, output: Path) -> str:
    """``path`` if it is a Hugging Face directory, else ours converted under ``output``."""
    if (Path(path) / "config.json").exists():
        return path
    from megatron_solopo.training import checkpoint as ckpt

    if ckpt.resolve_checkpoint(path) is None:
        raise ValueError(f"--checkpoint {path}: neither a Hugging Face directory (config.json) "
                         f"nor one of our checkpoints")
    target = output / "hf" / name
    if not (target / "config.json").exists():
        from megatron_solopo.convert import megatron_to_hf

        print(f"[evaluate] converting {path} to Hugging Face: {target}", flush=True)
        megatron_to_hf(path, target)
    return str(target)


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    try:
        return run(args)
    except ValueError as err:  # includes GenerationError
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    from megatron_solopo.evaluation import report, runner, tasks
    from megatron_solopo.generation import GeneratorConfig, build_generator

    checkpoints = parse_checkpoints(args.checkpoint)
    if not args.synthetic and not args.jsonl and not args.preference_data:
        raise ValueError("nothing to evaluate: give --synthetic, --jsonl and/or --preference-data")
    if args.baseline is not None and args.baseline not in checkpoints:
        raise ValueError(f"--baseline {args.baseline}: not a --checkpoint name "
                         f"({', '.join(checkpoints)})")
    examples = []
    if args.synthetic:
        multipliers = tasks.parse_multipliers(args.lengths)
        for task in [t.strip() for t in args.synthetic.split(",") if t.strip()]:
            from megatron_solopo.data.synthetic import TASKS

            if task not in TASKS:
                raise ValueError(f"--synthetic {task!r}; valid: {', '.join(TASKS)}")
            examples += tasks.synthetic_examples(task, args.num_examples, multipliers,
                                                 seed=args.seed)
    for path in args.jsonl:
        if not os.path.exists(path):
            raise ValueError(f"--jsonl {path} does not exist")
        examples += tasks.jsonl_examples(path, context_field=args.context_field)
    preference_records = None
    if args.preference_data:
        if not os.path.exists(args.preference_data):
            raise ValueError(f"--preference-data {args.preference_data} does not exist")
        with open(args.preference_data, encoding="utf-8") as handle:
            preference_records = [json.loads(line) for line in handle if line.strip()]

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    summaries = {}
    reference_hf = as_hf("reference", args.reference, output) if args.reference else None
    for name, path in checkpoints.items():
        hf_dir = as_hf(name, path, output)
        summary: dict = {"checkpoint": path}
        if examples:
            generator = build_generator(GeneratorConfig(
                backend=args.backend, model=hf_dir, tokenizer=args.tokenizer,
                device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                base_url=args.base_url))
            try:
                rows = runner.answer_examples(
                    generator, examples, output / name / "results.jsonl",
                    settings={"checkpoint": os.path.abspath(path), "backend": args.backend},
                    max_new_tokens=args.max_new_tokens)
            finally:
                generator.close()
            wanted = {example.id for example in examples}
            summary.update(report.summarize([row for row in rows if row["id"] in wanted]))
        if preference_records is not None:
            summary["preference"] = runner.preference_metrics(
                hf_dir, preference_records, reference_dir=reference_hf, beta=args.beta,
                tokenizer_dir=args.tokenizer)
        summaries[name] = summary
    baseline = summaries[args.baseline or next(iter(summaries))]
    for summary in summaries.values():
        report.add_retention_ratio(summary, baseline)

    tables = []
    if examples:
        task_names = sorted({task for s in summaries.values() for task in s["by_length"]})
        tables = [report.table(summaries, metric, task) for task in task_names
                  for metric in report.METRIC_NAMES]
    for name, summary in summaries.items():
        if "retention" in summary:
            retention = summary["retention"]
            ratio = retention.get("ratio")
            tables.append(f"retention {name}: sub-EM {retention['sub_em']:.3f} at "
                          f"{retention['length']}" + (f", {ratio:.3f} of the baseline's"
                                                       if ratio is not None else ""))
        for context, values in summary.get("preference", {}).items():
            tables.append(f"preference {name} {context}: " + ", ".join(
                f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                for key, value in values.items()))
    text = "\n\n".join(tables) + "\n"
    _write(output / "summary.json", json.dumps(summaries, indent=1))
    _write(output / "table.md", text)
    print(text, end="")
    if examples and not args.no_plot:
        series = {name: {length: cell["sub_em"] for length, cell in s["by_length"]["all"].items()}
                  for name, s in summaries.items()}
        try:
            path = report.plot_accuracy_vs_length(series, str(output / "accuracy_vs_length.png"))
            print(f"[evaluate] plot: {path}")
        except report.MissingPlotting as err:
            print(f"[evaluate] {err}", file=sys.stderr)
    print(f"[evaluate] {output / 'summary.json'}, {output / 'table.md'}")
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
