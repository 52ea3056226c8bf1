#!/usr/bin/env python
"""Measured cost of one training step for each objective, and the longest trainable length.

    python benchmarks/bench_step.py --objectives solopo,long_dpo,longpo \\
        --long-length 2048 --short-length 256 --steps 5 --json OUT.json

Objectives (``--objectives``, comma-separated; default all):

    solopo       SoLoPO, DPO base, SoLo-RA on the chosen response only (the paper's method):
                 short/chosen, short/rejected, long/chosen
    solopo_both  SoLoPO, DPO base, SoLo-RA on both responses (adds long/rejected)
    solopo_orpo  SoLoPO, ORPO base (reference-free), chosen only
    long_dpo     DPO on the long context (long/chosen, long/rejected): the baseline of the ratios
    long_orpo    ORPO on the long context
    longpo       LongPO (long/chosen with the NLL over the whole sequence, long/rejected)

Each objective runs in fresh process(es) (``--nproc`` ranks: gloo on CPU, NCCL on GPU, with the
``--tp/--cp/--pp`` layout) on a random-init Llama-shaped model and random-token records of exactly
``--long-length`` / ``--short-length`` tokens (responses of ``--response-length`` included),
``--global-batch-size`` groups per step, one group per micro-batch. It runs the real
``Trainer.train_step`` (packing, Megatron's schedule, response-only LM head, objective, optimizer);
precomputed reference log-probs are a lookup table (their one-off pass is not a training step),
``--reference live`` runs the frozen reference in the step.

Reported per objective: the median step time of ``--steps`` steps after ``--warmup``; tokens/s
(real tokens of the global batch / step time); model TFLOP/s per GPU; peak memory per GPU (the
largest rank): CUDA max allocated on GPU, on CPU the peak RSS of the process minus its RSS before
the trainer was built (i.e. what the run allocated: weights, gradients, optimizer state,
activations; interpreter and libraries excluded); and ``ratio_to_long_dpo`` (step time over
long_dpo's in the same run; ``memory_ratio_to_long_dpo`` likewise; ``min_ratio_to_long_dpo``
from the fastest steps, less disturbed on a shared machine), null without long_dpo.

Model FLOPs per step (training/metrics.py::forward_flops, the same as the log line's TFLOP/s):

    F = 3 * sum over micro-batches of [ 2 * N_dense * T
                                       + n_layers * sum_i 2 * L_i^2 * d_q
                                       + 2 * h * V_pad * P ]

with ``N_dense`` the transformer layers' matmul parameters (QKV, output, SwiGLU), ``T`` the packed
tokens (padding included), ``L_i`` the length of each packed *sequence* (attention is per
sequence, causal: half of ``4 L^2 d_q``; a shared-prefix segment ``[prefix | chosen |
rejected]`` counts the pairs its mask keeps: training/metrics.py::forward_flops), ``d_q`` = heads x head dim, ``h`` the hidden size,
``V_pad`` the padded vocabulary and ``P`` the positions whose log-prob is computed (responses;
LongPO's NLL sequence whole): the LM head is counted for what it computes. x3 = forward +
backward; a live reference adds one forward (x4/3). Recomputation is not counted (model FLOPs).
TFLOP/s per GPU = F summed over data-parallel ranks / step time / nproc.

``--find-max-length``: the longest long length per objective whose step fits a memory budget.
Probes grow (doubling, then steps of 1/8 of the last fit) up to ``--search-cap`` and stop at the
first that does not fit or at ``--search-seconds``. GPU: one process, a probe fits if its step
runs without CUDA out-of-memory (caught; memory freed) and under ``--memory-budget-gib`` (default:
the whole GPU). CPU: a fresh process per probe, peak memory as above against
``--memory-budget-gib`` (required). The planner's estimate (``--dry-run``,
training/planner.py::memory_estimate) is reported next to every measurement, with the length it
predicts for the same budget.

``--shared-prefix on|off|both`` sets ``data.shared_prefix`` (shared-prefix packing, docs/data.md;
unset: the config's default, on); ``both`` measures each objective both ways in one run. ``--attention-backend`` sets ``model.attention_backend``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1024 ** 3

OBJECTIVES = {
    "solopo": {"name": "solopo", "base": "dpo", "beta": 0.1, "alpha": 3.0},
    "solopo_both": {"name": "solopo", "base": "dpo", "beta": 0.1, "alpha": 3.0, "solo_ra": "both"},
    "solopo_orpo": {"name": "solopo", "base": "orpo", "alpha": 1.0},
    "long_dpo": {"name": "long_dpo", "beta": 0.1},
    "long_orpo": {"name": "orpo", "context": "long"},
    "longpo": {"name": "longpo", "beta": 0.1, "lambda": 0.01},
}
BASELINE = "long_dpo"

# Model shapes: Llama-3.2-1B's (tied embeddings, 128K vocabulary), and a tiny one for CPU.
PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                 num_query_groups=2, vocab_size=1000, untie_embeddings_and_output_weights=True),
    "llama-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                     num_query_groups=8, vocab_size=128256, untie_embeddings_and_output_weights=False),
}


class UsageError(ValueError):
    """A bad flag: printed as ``error: ...``, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Step time, throughput and peak memory per objective; max trainable length.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    add = parser.add_argument
    add("--objectives", default=",".join(OBJECTIVES),
        help=f"comma-separated, from: {', '.join(OBJECTIVES)} (default: all)")
    add("--long-length", default="2048",
        help="tokens of a long sequence (response included); a comma-separated list measures "
             "each length (on GPU in one process per objective)")
    add("--short-length", type=int, default=256, help="tokens of a short sequence (response included)")
    add("--response-length", type=int, default=64, help="tokens of each response")
    add("--global-batch-size", type=int, default=1, help="preference groups per step")
    add("--steps", type=int, default=5, help="timed steps (the median is reported)")
    add("--warmup", type=int, default=2, help="untimed steps first")
    add("--json", help="write the results here (atomically)")
    shape = parser.add_argument_group("model shape (a preset, then any field overridden)")
    shape.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vocab_size"):
        shape.add_argument("--" + field.replace("_", "-"), type=int, dest=field)
    add("--attention-backend", default="auto",
        help="model.attention_backend (as the installed ModelConfig accepts, e.g. auto|te|reference)")
    add("--precision", choices=["fp32", "bf16", "fp8"],
        help="default: bf16 on GPU, fp32 on CPU; fp8 = bf16 + FP8 GEMMs (Transformer Engine)")
    add("--recompute", choices=["none", "selective", "full"], default="none",
        help="activation recomputation (model.transformer_overrides.recompute_granularity)")
    add("--reference", choices=["precomputed", "live"], default="precomputed",
        help="where DPO/LongPO reference log-probs come from during the step")
    add("--logprob-chunk-size", type=int, default=4096, help="training.logprob_chunk_size")
    add("--shared-prefix", choices=["on", "off", "both"],
        help="data.shared_prefix (shared-prefix packing); unset: the config's default")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--nproc", type=int, default=1, help="ranks (gloo on CPU, NCCL on GPU)")
    layout.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    layout.add_argument("--cp", type=int, default=1, help="context_parallel_size")
    layout.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    layout.add_argument("--sp", action="store_true", help="sequence_parallel (with --tp > 1)")
    search = parser.add_argument_group("max trainable length")
    search.add_argument("--find-max-length", action="store_true")
    search.add_argument("--memory-budget-gib", type=float,
                        help="per GPU/process; required on CPU, default on GPU: the whole device")
    search.add_argument("--search-start", type=int, help="first probe (default: --long-length)")
    search.add_argument("--search-cap", type=int, default=262144, help="longest probe")
    search.add_argument("--search-granularity", type=int, default=256,
                        help="lengths are multiples of this")
    search.add_argument("--search-seconds", type=float, default=600.0,
                        help="time cap per objective; the result is then a lower bound")
    add("--skip-steps", action="store_true", help="only --find-max-length")
    add("--workdir", help="datasets and worker files (default: a temporary directory, removed)")
    add("--timeout", type=float, default=3600.0, help="seconds per worker run")
    add("--threads", type=int, help="torch threads per rank (default: cores / nproc)")
    add("--worker", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.worker:
        return args
    args.objective_names = [name.strip() for name in args.objectives.split(",") if name.strip()]
    unknown = [name for name in args.objective_names if name not in OBJECTIVES]
    if unknown or not args.objective_names:
        raise UsageError(f"--objectives: unknown {', '.join(unknown) or '(none given)'}; valid: "
                         f"{', '.join(OBJECTIVES)}")
    try:
        args.long_lengths = sorted({int(n) for n in str(args.long_length).split(",") if n.strip()})
    except ValueError:
        raise UsageError(f"--long-length {args.long_length!r}: integers, comma-separated") from None
    if not args.long_lengths:
        raise UsageError("--long-length: no length given")
    args.long_length = args.long_lengths[0]
    for flag in ("long_length", "short_length", "response_length", "global_batch_size", "steps",
                 "nproc", "tp", "cp", "pp", "search_cap", "search_granularity",
                 "logprob_chunk_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.response_length < args.short_length <= args.long_length:
        raise UsageError(f"need --response-length ({args.response_length}) < --short-length "
                         f"({args.short_length}) <= --long-length ({args.long_length})")
    if args.skip_steps and not args.find_max_length:
        raise UsageError("--skip-steps without --find-max-length measures nothing")
    import torch

    args.cuda = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if args.cuda else "fp32")
    if args.find_max_length:
        if not args.cuda and args.memory_budget_gib is None:
            raise UsageError("--find-max-length on CPU needs --memory-budget-gib (the peak memory "
                             "a probe may use per process)")
        if args.cuda and args.nproc > 1:
            raise UsageError("--find-max-length on GPU runs on one GPU (an out-of-memory on one "
                             "rank would stall the others): drop --nproc")
        if args.memory_budget_gib is not None and args.memory_budget_gib <= 0:
            raise UsageError(f"--memory-budget-gib must be > 0, got {args.memory_budget_gib}")
    if args.precision == "fp8":
        import importlib.util

        # find_spec, not an import: importing TE here could create a CUDA context in this process.
        if not (args.cuda and importlib.util.find_spec("transformer_engine") is not None):
            raise UsageError("--precision fp8 needs Transformer Engine on a GPU")
    args.search_start = args.search_start or args.long_length
    if args.find_max_length and args.search_start > args.search_cap:
        raise UsageError(f"--search-start {args.search_start} is above --search-cap "
                         f"{args.search_cap}")
    return args


def model_fields(args) -> dict:
    fields = dict(PRESETS[args.preset])
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "vocab_size"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def shared_prefix_variants(args) -> list:
    return {None: [None], "on": [True], "off": [False], "both": [False, True]}[args.shared_prefix]


def run_config(args, objective: str, long_length: int, token_budget: int, prefix: str,
               shared_prefix: Optional[bool]) -> dict:
    """The run config of one measurement (every section the trainer reads)."""
    max_positions = max(long_length, *args.long_lengths,
                        args.search_cap if args.find_max_length else 0)
    model = dict(model_fields(args), family="llama", attention_backend=args.attention_backend,
                 max_position_embeddings=max_positions)
    if args.recompute != "none":
        model["transformer_overrides"] = {"recompute_granularity": args.recompute}
        if args.recompute == "full":
            model["transformer_overrides"].update(recompute_method="uniform", recompute_num_layers=1)
    precision = {"bf16": args.precision != "fp32"}
    if args.precision == "fp8":
        precision["fp8"] = "hybrid"
    data = {"train_prefix": prefix, "max_tokens_per_micro_batch": token_budget, "shuffle": False}
    if shared_prefix is not None:
        data["shared_prefix"] = shared_prefix
    return {
        "model": model,
        "parallel": {"tensor_model_parallel_size": args.tp, "context_parallel_size": args.cp,
                     "pipeline_model_parallel_size": args.pp, "sequence_parallel": args.sp},
        "precision": precision,
        "data": data,
        "objective": dict(OBJECTIVES[objective]),
        "reference": {"mode": args.reference},
        "training": {"train_iters": 1000000, "global_batch_size": args.global_batch_size,
                     "seed": 1234, "logprob_chunk_size": args.logprob_chunk_size},
        "optimizer": {"lr": 1e-6, "min_lr": 0.0, "weight_decay": 0.0, "clip_grad": 1.0},
        "scheduler": {"lr_warmup_iters": 0, "lr_decay_style": "constant"},
        "logging": {"log_interval": 1000000},
    }


# ----------------------------------------------------------------------------------------------
# The max-length search (shared by the CPU driver here and the GPU worker)
# ----------------------------------------------------------------------------------------------
def search_max_length(probe: Callable[[int], bool], *, start: int, cap: int, granularity: int,
                      deadline: float) -> dict:
    """Longest length ``L <= cap`` (a multiple of ``granularity``) with ``probe(L)`` true,
    probing only increasing lengths: doubling from ``start``, then from the last fit upward in
    steps of 1/8 of it, until a probe fails. Stops early at ``deadline`` (time.monotonic());
    ``time_capped`` then says the answer is a lower bound. ``first_failure`` is the smallest
    length seen to fail (None: none failed)."""
    def rounded(length: int) -> int:
        return max(granularity, length // granularity * granularity)

    fit, failure, capped, length = None, None, False, rounded(start)
    while length <= cap:
        if time.monotonic() > deadline:
            capped = True
            break
        if not probe(length):
            failure = length
            break
        fit = length
        length = rounded(length * 2) if length < cap else cap + 1
        if fit < cap < length:
            length = rounded(cap)
            if length <= fit:
                break
    if fit is not None and not capped:
        step = rounded(max(granularity, fit // 8))
        length = fit + step
        while length <= cap and (failure is None or length < failure):
            if time.monotonic() > deadline:
                capped = True
                break
            if not probe(length):
                failure = length
                break
            fit = length
            length += step
    return {"max_length": fit, "first_failure": failure, "time_capped": capped}


# ----------------------------------------------------------------------------------------------
# Running workers
# ----------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


def launch(spec: dict, args, workdir: str, label: str) -> list:
    """Run the worker on ``--nproc`` ranks; returns each rank's result dict."""
    from megatron_solopo.parallel.distributed import free_port

    run_dir = tempfile.mkdtemp(prefix=label + "-", dir=workdir)
    spec = dict(spec, result_dir=run_dir,
                threads=args.threads or max(1, (os.cpu_count() or 1) // args.nproc))
    spec_path = os.path.join(run_dir, "spec.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    port = str(free_port())
    env_base = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        env_base.pop(name, None)  # ranks come from the environment below, never an allocation's
    procs = []
    for rank in range(args.nproc):
        # A port of our own also for one process: the default 29500 may be taken.
        env = dict(env_base, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if args.nproc > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank))
        else:
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(name, None)
        log = open(os.path.join(run_dir, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                        spec_path], env=env, stdout=log, stderr=subprocess.STDOUT),
                      log))
    deadline = time.monotonic() + args.timeout
    failed = None
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code != 0 and failed is None:
            failed = (rank, code)
            for other, _ in procs:  # the others would wait for the failed rank forever
                if other.poll() is None:
                    other.kill()
        log.close()
    for proc, _ in procs:
        proc.wait()
    if failed is not None:
        rank, code = failed
        with open(os.path.join(run_dir, f"rank{rank}.log")) as handle:
            tail = handle.read()[-3000:]
        raise WorkerError(f"{label}: rank {rank} ended with {code}:\n{tail}")
    results = []
    for rank in range(args.nproc):
        with open(os.path.join(run_dir, f"rank{rank}.json")) as handle:
            results.append(json.load(handle))
    shutil.rmtree(run_dir, ignore_errors=True)
    return results


def _dataset(args, workdir: str, long_length: int) -> str:
    from step_worker import dataset_prefix, write_dataset

    num_records = max(2, args.global_batch_size)
    prefix = dataset_prefix(workdir, long_length, args.short_length, args.response_length,
                            num_records, model_fields(args)["vocab_size"])
    return write_dataset(prefix, long_length=long_length, short_length=args.short_length,
                         response_length=args.response_length, num_records=num_records,
                         vocab_size=model_fields(args)["vocab_size"])


def _config_for(args, workdir: str, objective: str, long_length: int,
                shared_prefix: Optional[bool]) -> dict:
    from step_worker import token_budget

    prefix = _dataset(args, workdir, long_length)
    raw = run_config(args, objective, long_length, 1, prefix, shared_prefix)
    raw["data"]["max_tokens_per_micro_batch"] = token_budget(prefix, raw)
    return raw


def planner_gib(raw: dict, nproc: int) -> float:
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.planner import memory_estimate

    return memory_estimate(config_from_dict(raw), nproc)["total"] / GIB


def planner_max_length(args, workdir: str, objective: str, shared_prefix, budget_gib: float) -> Optional[int]:
    """The longest length (multiple of the granularity, <= cap) the planner says fits."""
    def fits(length: int) -> bool:
        return planner_gib(_planner_config(args, objective, length, shared_prefix), args.nproc) <= budget_gib

    granularity = args.search_granularity
    low, high = 0, args.search_cap // granularity
    while low < high:  # the estimate grows with the length: bisect on multiples
        middle = (low + high + 1) // 2
        if fits(middle * granularity):
            low = middle
        else:
            high = middle - 1
    return low * granularity or None


def _planner_config(args, objective, length, shared_prefix) -> dict:
    """The planner needs only the micro-batch budget, which follows from the lengths (one group
    per micro-batch) without writing a dataset."""
    from megatron_solopo.config import config_from_dict, resolved_objective
    from megatron_solopo.data.packing import pad_multiple_for, padded_length

    raw = run_config(args, objective, length, 1, "", shared_prefix)
    config = config_from_dict(raw)
    pad = pad_multiple_for(args.cp, args.tp, args.sp, fp8=args.precision == "fp8")
    lengths = {"long": length, "short": args.short_length}
    roles = resolved_objective(config).policy_roles
    raw["data"]["max_tokens_per_micro_batch"] = sum(padded_length(lengths[role.context], pad)
                                                    for role in roles)
    return raw


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def summarize(results: list, nproc: int) -> dict:
    """Per-objective numbers from the ranks' results."""
    errors = [r["error"] for r in results if r.get("error")]
    peak = max(r["peak_memory_gib"] for r in results)
    if errors:
        return {"error": errors[0], "peak_memory_gib": peak}
    # Each data-parallel rank processed its own groups; TP/CP/PP ranks of one DP rank share them.
    per_dp = {}
    for r in results:
        per_dp.setdefault(r["dp_rank"], r)
    tokens = sum(r["num_tokens"] for r in per_dp.values())
    flops = sum(r["flops"] for r in per_dp.values())
    # The slowest rank's median: every rank waits for it at the step's collectives.
    step_time = max(statistics.median(r["step_times_s"]) for r in results)
    losses = [loss for r in results for loss in r.get("losses", [])]
    # The fastest step too: on a shared machine it is the least disturbed by other work.
    fastest = max(min(r["step_times_s"]) for r in results)
    out = {"step_time_s": step_time, "step_time_min_s": fastest, "tokens_per_s": tokens / step_time,
           "tokens_per_s_per_gpu": tokens / step_time / nproc,
           "tflops_per_gpu": flops / step_time / nproc / 1e12,
           "peak_memory_gib": peak, "tokens_per_step": tokens, "model_flops_per_step": flops,
           "step_times_s": results[0]["step_times_s"],
           "skipped_steps": max(r.get("skipped_steps", 0) for r in results)}
    if losses:
        out["last_loss"] = losses[-1]
    for key in ("gpu", "gpu_memory_gib", "attention_backend"):
        if key in results[0]:
            out[key] = results[0][key]
    if "peak_rss_gib" in results[0]:
        out["peak_rss_gib"] = max(r["peak_rss_gib"] for r in results)
    return out


def _error_row(err: WorkerError) -> dict:
    return {"error": str(err).splitlines()[0], "details": str(err)}


def measure_steps(args, workdir: str, objective: str, shared_prefix) -> dict:
    """{long length: row} for every ``--long-length``. On GPU one process measures every length
    (CUDA's peak statistics reset per length); on CPU each length gets a fresh process, since a
    process's peak RSS cannot be reset."""
    from step_worker import token_budget

    raws = {n: _config_for(args, workdir, objective, n, shared_prefix) for n in args.long_lengths}
    rows = {}
    if args.cuda and len(raws) > 1:
        first = raws[args.long_lengths[0]]
        lengths = [{"long_length": n, "prefix": raw["data"]["train_prefix"],
                    "token_budget": token_budget(raw["data"]["train_prefix"], raw)}
                   for n, raw in raws.items()]
        spec = {"raw": first, "mode": "steps", "steps": args.steps, "warmup": args.warmup,
                "lengths": lengths}
        try:
            results = launch(spec, args, workdir, objective)
            for index, n in enumerate(args.long_lengths):
                rows[n] = summarize([r["by_length"][index] if "by_length" in r else r
                                     for r in results], args.nproc)
        except WorkerError as err:
            rows = {n: _error_row(err) for n in args.long_lengths}
    else:
        for n, raw in raws.items():
            spec = {"raw": raw, "mode": "steps", "steps": args.steps, "warmup": args.warmup}
            try:
                rows[n] = summarize(launch(spec, args, workdir, f"{objective}-L{n}"), args.nproc)
            except WorkerError as err:
                rows[n] = _error_row(err)
    for n, raw in raws.items():
        rows[n]["planner_estimate_gib"] = planner_gib(raw, args.nproc)
    return rows


def find_max_length(args, workdir: str, objective: str, shared_prefix) -> dict:
    budget = args.memory_budget_gib
    if args.cuda:
        raw = _config_for(args, workdir, objective, args.search_start, shared_prefix)
        spec = {"raw": raw, "mode": "search", "workdir": workdir,
                "short_length": args.short_length, "response_length": args.response_length,
                "num_records": max(2, args.global_batch_size),
                "vocab_size": model_fields(args)["vocab_size"],
                "search": {"budget_gib": budget, "start": args.search_start, "cap": args.search_cap,
                           "granularity": args.search_granularity,
                           "max_seconds": args.search_seconds}}
        (result,) = launch(spec, args, workdir, objective + "-search")
        if result.get("error"):
            return {"error": result["error"]}
        found = result["search"]
        budget = found["budget_gib"]
    else:
        probes = []

        def probe(length: int) -> bool:
            raw = _config_for(args, workdir, objective, length, shared_prefix)
            spec = {"raw": raw, "mode": "steps", "steps": 1, "warmup": 1}
            start = time.perf_counter()
            try:
                row = summarize(launch(spec, args, workdir, f"{objective}-L{length}"), args.nproc)
            except WorkerError as err:
                row = {"error": str(err).splitlines()[0]}
            fits = not row.get("error") and row["peak_memory_gib"] <= budget
            probes.append({"long_length": length, "peak_memory_gib": row.get("peak_memory_gib"),
                           "fits": fits, "error": row.get("error"),
                           "seconds": time.perf_counter() - start})
            print(f"[bench_step] {objective} at {length}: peak "
                  f"{_fmt(row.get('peak_memory_gib'))} GiB, {'fits' if fits else 'does not fit'} "
                  f"{budget} GiB", file=sys.stderr, flush=True)
            return fits

        found = search_max_length(probe, start=args.search_start, cap=args.search_cap,
                                  granularity=args.search_granularity,
                                  deadline=time.monotonic() + args.search_seconds)
        found = dict(found, probes=probes, budget_gib=budget)
    for row in found["probes"]:
        row["planner_estimate_gib"] = planner_gib(
            _planner_config(args, objective, row["long_length"], shared_prefix), args.nproc)
    found["planner_max_length"] = planner_max_length(args, workdir, objective, shared_prefix,
                                                     found["budget_gib"])
    return found


def machine() -> dict:
    import torch

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        # The GPU's name and memory come from the workers: querying them here would create a
        # CUDA context in this process, taking GPU memory from the measurements.
        info["cuda"] = torch.version.cuda
    import importlib.util

    info["transformer_engine_installed"] = importlib.util.find_spec("transformer_engine") is not None
    return info


def add_ratios(rows: dict, variants: list) -> None:
    for variant in variants:
        base = rows.get(key_of(BASELINE, variant), {})
        for name, row in rows.items():
            if row.get("shared_prefix") != variant:
                continue
            ok = "step_time_s" in row and "step_time_s" in base
            row["ratio_to_long_dpo"] = row["step_time_s"] / base["step_time_s"] if ok else None
            row["min_ratio_to_long_dpo"] = (row["step_time_min_s"] / base["step_time_min_s"]
                                            if ok and "step_time_min_s" in row
                                            and "step_time_min_s" in base else None)
            mem_ok = row.get("peak_memory_gib") and base.get("peak_memory_gib")
            row["memory_ratio_to_long_dpo"] = (row["peak_memory_gib"] / base["peak_memory_gib"]
                                               if mem_ok and ok else None)


def key_of(objective: str, shared_prefix) -> str:
    return objective + ("+shared_prefix" if shared_prefix else "")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_report(report: dict) -> str:
    lines = []
    config = report["config"]
    lines.append(f"long {','.join(map(str, config['long_lengths']))} / short {config['short_length']} tokens "
                 f"(responses {config['response_length']}), {config['global_batch_size']} group(s)"
                 f"/step, model {config['model']}, {config['precision']}, layout nproc="
                 f"{config['nproc']} tp={config['tp']} cp={config['cp']} pp={config['pp']}, "
                 f"attention {config['attention_backend']}")
    for length, objectives in report.get("by_length", {}).items():
        if len(report["by_length"]) > 1:
            lines.append(f"long length {length}:")
        header = ("objective", "step s", "tokens/s", "TFLOP/s/GPU", "peak GiB", "planner GiB",
                  "time/long_dpo", "mem/long_dpo")
        rows = [header]
        for name, row in objectives.items():
            if row.get("error"):
                rows.append((name, "error: " + row["error"][:60], "", "", _fmt(row.get("peak_memory_gib")),
                             _fmt(row.get("planner_estimate_gib")), "", ""))
                continue
            rows.append((name, _fmt(row["step_time_s"]), _fmt(row["tokens_per_s"]),
                         _fmt(row["tflops_per_gpu"]), _fmt(row["peak_memory_gib"]),
                         _fmt(row["planner_estimate_gib"]), _fmt(row.get("ratio_to_long_dpo")),
                         _fmt(row.get("memory_ratio_to_long_dpo"))))
        lines += _table(rows)
    if report.get("max_length"):
        lines.append("")
        rows = [("objective", "max long length", "first failure", "budget GiB", "planner max",
                 "time capped")]
        for name, row in report["max_length"].items():
            if row.get("error"):
                rows.append((name, "error: " + row["error"][:60], "", "", "", ""))
                continue
            rows.append((name, _fmt(row["max_length"]), _fmt(row["first_failure"]),
                         _fmt(row["budget_gib"]), _fmt(row["planner_max_length"]),
                         "yes" if row["time_capped"] else "no"))
        lines += _table(rows)
        ratio = report.get("max_length_ratio_solopo_to_long_dpo")
        if ratio is not None:
            lines.append(f"max length solopo / long_dpo: {ratio:.2f}x")
    return "\n".join(lines)


def _table(rows: list) -> list:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def write_json(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", dir=directory)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)


def validate_layout(args, workdir: str) -> None:
    """Config and layout errors (an unknown attention backend, TP not dividing the heads, a world
    the layout does not fill) as a flag error before any worker starts."""
    try:
        for objective in args.objective_names:
            planner_gib(_planner_config(args, objective, args.long_length,
                                        shared_prefix_variants(args)[0]), args.nproc)
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv: Optional[list] = None) -> int:
    sys.path.insert(0, HERE)
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.worker:
        from step_worker import worker_main

        return worker_main(args.worker)
    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="bench-step-") if own_workdir else args.workdir
    os.makedirs(workdir, exist_ok=True)
    try:
        try:
            validate_layout(args, workdir)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        variants = shared_prefix_variants(args)
        report = {"machine": machine(), "config": {
            "long_length": args.long_length, "long_lengths": args.long_lengths,
            "short_length": args.short_length,
            "response_length": args.response_length, "global_batch_size": args.global_batch_size,
            "steps": args.steps, "warmup": args.warmup, "model": dict(model_fields(args), preset=args.preset),
            "precision": args.precision, "recompute": args.recompute, "reference": args.reference,
            "attention_backend": args.attention_backend, "nproc": args.nproc, "tp": args.tp,
            "cp": args.cp, "pp": args.pp, "sp": args.sp, "shared_prefix": args.shared_prefix}}
        if not args.skip_steps:
            by_length = {n: {} for n in args.long_lengths}
            for variant in variants:
                for objective in args.objective_names:
                    for n, row in measure_steps(args, workdir, objective, variant).items():
                        for key in ("gpu", "gpu_memory_gib", "attention_backend"):
                            if key in row:
                                report["machine"][key] = row.pop(key)
                        by_length[n][key_of(objective, variant)] = dict(
                            row, objective=objective, shared_prefix=variant, long_length=n)
                        print(f"[bench_step] {key_of(objective, variant)} at {n}: "
                              + ("error " + row["error"] if row.get("error") else
                                 f"{row['step_time_s']:.3f} s/step, peak "
                                 f"{row['peak_memory_gib']:.3f} GiB"), file=sys.stderr, flush=True)
                    for rows in by_length.values():
                        add_ratios(rows, variants)
                    report["by_length"] = {str(n): rows for n, rows in by_length.items()}
                    report["objectives"] = by_length[args.long_lengths[0]]
                    if args.json:  # what is measured so far survives an interrupted run
                        write_json(args.json, report)
        if args.find_max_length:
            found = {}
            for variant in variants:
                for objective in args.objective_names:
                    found[key_of(objective, variant)] = dict(
                        find_max_length(args, workdir, objective, variant), objective=objective,
                        shared_prefix=variant)
            report["max_length"] = found
            solopo, base = found.get(key_of("solopo", variants[0])), found.get(key_of(BASELINE, variants[0]))
            if solopo and base and solopo.get("max_length") and base.get("max_length"):
                report["max_length_ratio_solopo_to_long_dpo"] = solopo["max_length"] / base["max_length"]
        print(format_report(report))
        if args.json:
            write_json(args.json, report)
        failed = [name for name, row in {**report.get("objectives", {}),
                                         **report.get("max_length", {})}.items() if row.get("error")
                  and row["error"] != "out of memory"]
        return 1 if failed else 0
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
