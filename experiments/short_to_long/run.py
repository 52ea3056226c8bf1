#!/usr/bin/env python
"""Does short-to-long alignment transfer? A small-scale reproduction (docs/results/short_to_long.md).

    python experiments/short_to_long/run.py --out runs/s2l [--seeds 3] [--tiny]

1. a tiny byte-level BPE tokenizer and a random Llama-style model (Hugging Face, converted to
   our checkpoint format);
2. SFT (``objective: sft``) on the synthetic tasks at their short length only;
3. per seed: preference pairs made by the SFT model itself (pairs.py), then from the same SFT
   checkpoint, at an equal budget of training steps: (a) DPO on the short context, (b) Long-DPO
   on the long context (the same short-sampled pairs: SoLoPO's "expand-long" baseline),
   (c) SoLoPO with a DPO base, (d) SoLoPO with an ORPO base, (e) LongPO; every run with the
   project's Trainer (worker.py, one process on CPU; a GPU when present);
4. every checkpoint answers fresh questions at 1x, 2x, 4x and 8x the short length (greedy,
   sub-EM and F1 from megatron_solopo.evaluation);
5. ``results.json``, ``results.md`` (mean and spread over seeds) and plots (accuracy vs length
   per method; accuracy vs training wall-clock).

Every stage leaves a marker, so the command started again resumes; results are written after
every run, so partial results are usable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.short_to_long import analysis, pairs  # noqa: E402

METHODS = {
    # name: (objective, dataset). Hyper-parameters: the papers' defaults.
    "dpo_short": ({"name": "dpo", "beta": 0.1}, "solopo"),
    "long_dpo": ({"name": "long_dpo", "beta": 0.1}, "solopo"),
    "solopo_dpo": ({"name": "solopo", "base": "dpo", "beta": 0.1, "alpha": 3.0}, "solopo"),
    "solopo_orpo": ({"name": "solopo", "base": "orpo", "lambda": 0.1, "alpha": 1.0}, "solopo"),
    "longpo": ({"name": "longpo", "beta": 0.1, "lambda": 0.01}, "longpo"),
    # ablations (not in the default list; --methods adds them)
    "longpo_no_nll": ({"name": "longpo", "beta": 0.1, "lambda": 0.01, "nll_weight": 0.0}, "longpo"),
    "solopo_dpo_huber": ({"name": "solopo", "base": "dpo", "beta": 0.1, "alpha": 3.0,
                         "solo_ra_huber_delta": 0.05}, "solopo"),
    "solopo_dpo_shortref": ({"name": "solopo", "base": "dpo", "beta": 0.1, "alpha": 3.0,
                            "solo_ra_reference": "short"}, "solopo"),
}
DEFAULT_METHODS = ("dpo_short", "long_dpo", "solopo_dpo", "solopo_orpo", "longpo")


@dataclasses.dataclass
class Sizes:
    """Everything that sets the cost. ``full`` is sized for about an hour on a 2-core CPU."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 192
    vocab: int = 2048
    number_tokens: bool = True  # the tokenizer learns every 3-digit answer as one token
    tasks: tuple = ("needle",)  # kv_retrieval too with --tasks (a longer SFT is needed)
    sft_records: int = 8000  # per task
    sft_steps: int = 1600
    sft_lr: float = 5e-3
    batch: int = 16  # SFT global batch
    align_batch: int = 8  # alignment global batch (preference groups)
    pair_questions: int = 256  # per task and seed
    pair_samples: int = 16
    pair_temperature: float = 0.85  # the SoLoPO paper's
    long_multiplier: int = 4  # training long context = this x the short length
    align_steps: int = 150
    align_lr: float = 3e-4
    eval_examples: int = 50  # per task and length
    lengths: tuple = (1, 2, 4, 8)
    max_new_tokens: int = 24
    pair_fallback: bool = False  # questions without a self-made pair use the synthetic pair


TINY = Sizes(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, vocab=300, number_tokens=False,
             tasks=("kv_retrieval", "needle"),
             sft_records=24, sft_steps=6, sft_lr=3e-3, batch=4, align_batch=4, pair_questions=6,
             pair_samples=4, align_steps=3, eval_examples=3, lengths=(1, 2), max_new_tokens=12,
             pair_fallback=True)


def log(message: str) -> None:
    print(f"[s2l {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def python_env() -> dict:
    from megatron_solopo.parallel.distributed import free_port

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # one process, whatever launched us
    return env


def run_logged(command: list, log_path: Path) -> None:
    with open(log_path, "w") as handle:
        result = subprocess.run(command, cwd=REPO, env=python_env(), stdout=handle,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, command))} failed (exit {result.returncode}); "
                           f"log {log_path}:\n{tail}")


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def build_start(out: Path, sizes: Sizes, seed: int) -> dict:
    """Tokenizer, random HF model, our checkpoint of it."""
    paths = {"tokenizer": out / "tokenizer", "hf_init": out / "init_hf", "init": out / "init"}
    if (out / "init.done").exists():
        return paths
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint
    from megatron_solopo.data.tiny_tokenizers import make_hf_tokenizer

    for path in paths.values():
        if path.exists():
            shutil.rmtree(path)
    texts = None
    if sizes.number_tokens:
        # Answers (3-digit numbers) as single tokens: copying one is then one attention step,
        # which a model this small learns within the SFT budget.
        from megatron_solopo.data.synthetic import corpus

        texts = corpus() + [f"is {n}. value {n}" for n in range(100, 1000)] * 4
    make_hf_tokenizer(str(paths["tokenizer"]), vocab_size=sizes.vocab, texts=texts)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    make_tiny_hf_checkpoint(paths["hf_init"], "llama_gqa_untied", tokenizer=False, seed=seed,
                            max_shard_size="1GB", hidden_size=sizes.hidden,
                            intermediate_size=sizes.ffn, num_hidden_layers=sizes.layers,
                            num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
                            vocab_size=vocab, max_position_embeddings=8192)
    for item in paths["tokenizer"].iterdir():
        shutil.copy(item, paths["hf_init"] / item.name)
    from megatron_solopo.convert import hf_to_megatron

    hf_to_megatron(paths["hf_init"], paths["init"])
    (out / "init.done").write_text("ok\n")
    return paths


def preprocess(records: list, prefix: Path, tokenizer: Path) -> None:
    from megatron_solopo.data.preprocess import preprocess as run
    from megatron_solopo.data.synthetic import write_jsonl

    write_jsonl(records, str(prefix) + ".jsonl")
    run([str(prefix) + ".jsonl"], str(prefix), "HuggingFaceTokenizer", str(tokenizer), workers=1)


def train_config(*, objective: dict, data: Path, tokenizer: Path, load: Path, save: Path,
                 run: Path, steps: int, batch: int, lr: float, seed: int,
                 reference: Path | None) -> dict:
    config = {
        "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tokenizer)},
        "data": {"train_prefix": str(data), "max_tokens_per_micro_batch": 16384},
        "training": {"train_iters": steps, "global_batch_size": batch, "seed": seed},
        "optimizer": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.0, "clip_grad": 1.0},
        "scheduler": {"lr_warmup_iters": max(1, steps // 10), "lr_decay_style": "cosine"},
        "checkpoint": {"load": str(load), "save": str(save), "save_interval": 0},
        "logging": {"log_interval": 1, "metrics_jsonl": str(run / "metrics.jsonl")},
        "objective": objective,
        "reference": {"mode": "auto"},
    }
    if reference is not None:
        config["reference"] = {"mode": "precomputed", "checkpoint": str(reference),
                               "cache": str(run / "reference.npz")}
    return config


def train(run: Path, config: dict, isolate: bool = False) -> dict:
    """worker.py's train_run, here or (``isolate``) in a fresh process; returns its report."""
    import yaml

    if (run / "worker.json").exists() and (run / "hf" / "config.json").exists():
        return json.loads((run / "worker.json").read_text())
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    if isolate:
        run_logged([sys.executable, str(Path(__file__).with_name("worker.py")), str(run)],
                   run / "train.log")
    else:
        from experiments.short_to_long.worker import train_run

        with open(run / "train.log", "w") as handle, contextlib.redirect_stdout(handle):
            with _environment(MASTER_PORT=str(_free_port())):
                train_run(str(run))
    report = json.loads((run / "worker.json").read_text())
    report["process_s"] = time.perf_counter() - started
    write_json(run / "worker.json", report)
    return report


@contextlib.contextmanager
def _environment(**values):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_port() -> int:
    from megatron_solopo.parallel.distributed import free_port

    return free_port()


def generator_for(hf_dir: Path, seed: int, batch_size: int = 32):
    from megatron_solopo.generation import GeneratorConfig, build_generator

    return build_generator(GeneratorConfig(backend="hf", model=str(hf_dir), seed=seed,
                                           device="auto", dtype="float32", batch_size=batch_size,
                                           progress=False))


def evaluate(hf_dir: Path, out_dir: Path, sizes: Sizes, eval_seed: int, name: str) -> dict:
    from megatron_solopo.evaluation import report, runner, tasks

    done = out_dir / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    examples = [example for task in sizes.tasks for example in
                tasks.synthetic_examples(task, sizes.eval_examples, sizes.lengths, seed=eval_seed)]
    generator = generator_for(hf_dir, eval_seed)
    started = time.perf_counter()
    rows = runner.answer_examples(generator, examples, out_dir / "results.jsonl",
                                  settings={"checkpoint": str(hf_dir), "eval_seed": eval_seed},
                                  max_new_tokens=sizes.max_new_tokens, log=log)
    summary = report.summarize(rows)
    summary["eval_s"] = time.perf_counter() - started
    write_json(done, summary)
    log(f"{name}: sub-EM by length " + ", ".join(
        f"{length} {cell['sub_em']:.3f}" for length, cell in summary["by_length"]["all"].items()))
    return summary


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work and results directory (resumes)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds per stage)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--align-steps", type=int, default=None,
                        help="training steps of every alignment run (default: the preset's)")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps")
    parser.add_argument("--tasks", default=None,
                        help="synthetic tasks, comma-separated (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a size of the preset (a field of Sizes in run.py), e.g. "
                             "--set pair_samples=8; repeatable")
    parser.add_argument("--isolate", action="store_true",
                        help="each training run in a fresh process (default: in this one)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    sizes = dataclasses.replace(TINY) if args.tiny else Sizes()
    if args.align_steps is not None:
        sizes.align_steps = args.align_steps
    if args.sft_steps is not None:
        sizes.sft_steps = args.sft_steps
    for item in args.set:
        field, _, value = item.partition("=")
        default = getattr(sizes, field, None)
        if not value or field not in {f.name for f in dataclasses.fields(Sizes)} or isinstance(
                default, tuple):
            parser.error(f"--set {item!r}: give FIELD=VALUE with FIELD a number or flag of "
                         f"Sizes (tasks: --tasks)")
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                parsed = value.lower() == "true"
            else:
                parsed = type(default)(value)
        except ValueError:
            parser.error(f"--set {item!r}: {field} takes a {type(default).__name__}")
        setattr(sizes, field, parsed)
    if args.tasks is not None:
        from megatron_solopo.data.synthetic import TASKS

        sizes.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        if not sizes.tasks or any(t not in TASKS for t in sizes.tasks):
            parser.error(f"--tasks {args.tasks!r}; valid: {', '.join(TASKS)}")
    if min(sizes.align_steps, sizes.sft_steps) < 2:
        parser.error("--align-steps and --sft-steps must be >= 2")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"sizes": dataclasses.asdict(sizes), "methods": methods, "seeds": args.seeds}
    settings_path = out / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous["sizes"] != json.loads(json.dumps(settings["sizes"])):
            parser.error(f"--out {out} holds an experiment with other sizes; choose another")
        # Methods of earlier invocations stay in the results (their runs are not redone).
        methods = list(dict.fromkeys(previous["methods"] + methods))
        settings["methods"] = methods
        settings["seeds"] = max(args.seeds, previous["seeds"])
    write_json(settings_path, settings)
    log(f"experiment in {out}: methods {', '.join(methods)}, {args.seeds} seed(s)")
    started = time.time()

    paths = build_start(out, sizes, seed=0)
    # SFT at the short length only: records without their long context.
    sft_data = out / "data" / "sft"
    if not (out / "data" / "sft.done").exists():
        from megatron_solopo.data import synthetic

        sft_data.parent.mkdir(parents=True, exist_ok=True)
        records = []
        for number, task in enumerate(sizes.tasks):
            for record in synthetic.generate_records(task, sizes.sft_records, seed=100 + number,
                                                     long_length=1):
                record.pop("long_context")
                records.append(record)
        preprocess(records, sft_data, paths["tokenizer"])
        (out / "data" / "sft.done").write_text("ok\n")
    sft_run = out / "runs" / "sft"
    sft_report = train(sft_run, train_config(
        objective={"name": "sft", "context": "short"}, data=sft_data,
        tokenizer=paths["tokenizer"], load=paths["init"], save=sft_run / "checkpoints", run=sft_run,
        steps=sizes.sft_steps, batch=sizes.batch, lr=sizes.sft_lr, seed=0, reference=None),
        args.isolate)
    sft_hf = sft_run / "hf"
    # Alignment starts from the SFT weights only (fresh optimizer and schedule): a release
    # checkpoint converted back from the SFT model's Hugging Face export.
    sft_ckpt = out / "sft_release"
    if not (out / "sft_release.done").exists():
        from megatron_solopo.convert import hf_to_megatron

        if sft_ckpt.exists():
            shutil.rmtree(sft_ckpt)
        hf_to_megatron(sft_hf, sft_ckpt)
        (out / "sft_release.done").write_text("ok\n")
    log(f"SFT: loss {sft_report['losses'][0]:.3f} -> {sft_report['losses'][-1]:.3f} in "
        f"{sft_report['steps']} steps ({sft_report['step_time_s']:.0f} s)")
    eval_seed = 999
    results = {"settings": settings, "sft": {"train": _train_summary(sft_report),
                                             "eval": evaluate(sft_hf, out / "eval" / "sft", sizes,
                                                              eval_seed, "sft")},
               "runs": []}
    analysis.write_all(out, results)

    for seed in range(settings["seeds"]):
        data_dir = out / "data" / f"seed{seed}"
        pair_stats_path = data_dir / "pairs.json"
        if not pair_stats_path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            generator = generator_for(sft_hf, seed)
            questions = pairs.prompt_records(sizes.tasks, sizes.pair_questions,
                                             sizes.long_multiplier, seed=seed + 1)
            begun = time.perf_counter()
            solopo, solopo_stats = pairs.solopo_pairs(
                generator, questions, num_samples=sizes.pair_samples,
                temperature=sizes.pair_temperature, max_new_tokens=sizes.max_new_tokens, seed=seed,
                fallback=sizes.pair_fallback)
            solopo_stats["seconds"] = time.perf_counter() - begun
            begun = time.perf_counter()
            longpo, longpo_stats = pairs.longpo_pairs(generator, questions,
                                                      max_new_tokens=sizes.max_new_tokens,
                                                      fallback=sizes.pair_fallback)
            longpo_stats["seconds"] = time.perf_counter() - begun
            for name, records in (("solopo", solopo), ("longpo", longpo)):
                if not records:
                    raise RuntimeError(f"seed {seed}: the SFT model made no {name} pair; "
                                       f"train SFT longer (--sft-steps)")
                preprocess(records, data_dir / name, paths["tokenizer"])
            write_json(pair_stats_path, {"solopo": solopo_stats, "longpo": longpo_stats})
            log(f"seed {seed}: pairs {json.loads(pair_stats_path.read_text())}")
        pair_stats = json.loads(pair_stats_path.read_text())
        for method in methods:
            objective, dataset = METHODS[method]
            run = out / "runs" / f"{method}-seed{seed}"
            needs_reference = objective["name"] in ("dpo", "long_dpo", "longpo") or (
                objective["name"] == "solopo" and objective["base"] == "dpo")
            report = train(run, train_config(
                objective=dict(objective), data=data_dir / dataset, tokenizer=paths["tokenizer"],
                load=sft_ckpt, save=run / "checkpoints", run=run, steps=sizes.align_steps,
                batch=sizes.align_batch, lr=sizes.align_lr, seed=seed,
                reference=sft_ckpt if needs_reference else None), args.isolate)
            summary = evaluate(run / "hf", out / "eval" / f"{method}-seed{seed}", sizes,
                               eval_seed, f"{method} seed {seed}")
            results["runs"].append({"method": method, "seed": seed, "dataset": dataset,
                                    "pairs": pair_stats[dataset], "train": _train_summary(report),
                                    "eval": summary})
            analysis.write_all(out, results)
    results["elapsed_s"] = time.time() - started
    analysis.write_all(out, results)
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {out / 'results.md'}")
    return 0


def _train_summary(report: dict) -> dict:
    history = [row for row in report.get("metrics", []) if not row.get("eval")]
    numbers = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in history]
    summary = {key: report.get(key) for key in ("steps", "step_time_s", "tokens", "flops",
                                                "reference_s", "setup_s", "process_s",
                                                "skipped_steps", "losses")}
    summary["grad_norms"] = [row.get("grad_norm") for row in history]
    summary["first_metrics"] = numbers[0] if numbers else {}
    summary["last_metrics"] = numbers[-1] if numbers else {}
    return summary

if __name__ == "__main__":
    sys.exit(main())
