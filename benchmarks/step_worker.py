"""The measuring side of benchmarks/bench_step.py: random-token datasets, the real Trainer's step,
and per-process peak memory. One worker process (or ``--nproc`` of them, one per rank) runs one
objective; bench_step.py starts it as ``python benchmarks/bench_step.py --worker SPEC.json``.

The worker runs ``Trainer.train_step`` unchanged: packing, Megatron's schedule, the response-only
LM head, the objective, the optimizer step. Only where reference log-probs come from differs:
with ``reference: precomputed`` (the trainer's default for objectives with a reference) the
one-off precompute pass is not part of a training step, so the worker fills the lookup table it
would have produced with constants instead of running it; ``reference: live`` runs the real live
reference (a frozen copy of the model, one forward per step).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# Data: every record has the four roles at exactly the requested lengths
# ----------------------------------------------------------------------------------------------
def dataset_prefix(workdir: str, long_length: int, short_length: int, response_length: int,
                   num_records: int, vocab_size: int) -> str:
    return os.path.join(workdir, f"data_L{long_length}_S{short_length}_R{response_length}_"
                                 f"N{num_records}_V{vocab_size}")


def write_dataset(prefix: str, *, long_length: int, short_length: int, response_length: int,
                  num_records: int, vocab_size: int, seed: int = 0) -> str:
    """A preprocessed preference dataset of random tokens: per record a short and a long context
    (``short_length`` / ``long_length`` tokens *including* the response) with the same chosen
    and rejected responses (``response_length`` tokens each). The long sequences of a record
    share their context, as real long/chosen and long/rejected do. Kept if already written."""
    import megatron_solopo  # noqa: F401  (triton stub before megatron imports)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_solopo.data.dataset import (DATA_SUFFIXES, FORMAT_NAME, FORMAT_VERSION,
                                              SIDECAR_SUFFIX, SPANS_SUFFIX)
    from megatron_solopo.roles import ALL_ROLES

    if os.path.exists(prefix + SIDECAR_SUFFIX):
        return prefix
    if not 0 < response_length < short_length <= long_length:
        raise ValueError(f"lengths must satisfy 0 < response ({response_length}) < short "
                         f"({short_length}) <= long ({long_length})")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = DType.optimal_dtype(vocab_size)
    tokens_builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype, multimodal=True)
    spans_builder = IndexedDatasetBuilder(prefix + SPANS_SUFFIX + ".bin", dtype=np.int32)
    num_tokens = 0
    with open(prefix + ".ids", "w") as ids:
        for index in range(num_records):
            contexts = {"short": rng.integers(3, vocab_size, short_length - response_length),
                        "long": rng.integers(3, vocab_size, long_length - response_length)}
            responses = {"chosen": rng.integers(3, vocab_size, response_length),
                         "rejected": rng.integers(3, vocab_size, response_length)}
            sequences, spans = [], []
            for role in ALL_ROLES:
                context = contexts[role.context]
                sequences.append(np.concatenate([context, responses[role.response]]))
                spans += [len(context), len(context) + response_length]
            tokens = np.concatenate(sequences).astype(np.int32)
            num_tokens += len(tokens)
            tokens_builder.add_document(tokens, [len(s) for s in sequences],
                                        [role.index for role in ALL_ROLES])
            spans_builder.add_document(np.asarray(spans, dtype=np.int32), [2] * len(sequences))
            ids.write(json.dumps(f"bench-{index}") + "\n")
    tokens_builder.finalize(prefix + ".idx")
    spans_builder.finalize(prefix + SPANS_SUFFIX + ".idx")
    described = {"type": "SentencePieceTokenizer", "name": "random tokens (benchmark)",
                 "fingerprint": f"random-{vocab_size}", "vocab_size": vocab_size, "model": ""}
    sidecar = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": described,
        "vocab_size": vocab_size, "pad_id": 0, "eos_id": 2, "bos_id": 1,
        "token_dtype": np.dtype(dtype).name, "num_records": num_records,
        "num_multi_turn_records": 0, "num_sequences": 4 * num_records, "num_tokens": num_tokens,
        "roles": {role.value: num_records for role in ALL_ROLES},
        "sequences": {role.value: num_records for role in ALL_ROLES},
        "requested_roles": [role.value for role in ALL_ROLES],
        "max_length": {"short": short_length, "long": long_length},
        "source_hash": f"random-L{long_length}-S{short_length}-R{response_length}-seed{seed}",
        "files": {suffix: os.path.getsize(prefix + suffix) for suffix in DATA_SUFFIXES},
    }
    tmp = f"{prefix}{SIDECAR_SUFFIX}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(sidecar, handle, indent=1)
    os.replace(tmp, prefix + SIDECAR_SUFFIX)  # last: the dataset exists once this does
    return prefix


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
def _trainer_class():
    from megatron_solopo.training.trainer import Trainer

    class BenchTrainer(Trainer):
        """The Trainer with precomputed reference values made up instead of loaded (see the
        module docstring); ``reference.mode: live`` and reference-free objectives unchanged."""

        def _setup_reference(self) -> None:
            if self.reference_mode != "precomputed":
                return super()._setup_reference()
            self.reference_model = None
            self.valid_reference_values = None
            self.reference_values = constant_reference_values(self.train_set,
                                                              self.objective.reference_roles)

        def use_dataset(self, prefix: str, token_budget: int) -> None:
            """Train on another dataset from now on (a max-length probe), same model/optimizer."""
            from megatron_solopo.data.dataset import PreferenceDataset
            from megatron_solopo.data.sampler import PreferenceSampler
            from megatron_solopo.training.batches import cycle

            self.config.data.max_tokens_per_micro_batch = token_budget
            self.train_set = PreferenceDataset(prefix)
            self.builder = self._builder(self.train_set, self.objective.policy_roles)
            self.sampler = PreferenceSampler(len(self.train_set), self.config.training.global_batch_size,
                                             self.dp_rank, self.dp_size, seed=0, consumed_samples=0,
                                             shuffle=False)
            self.batches = cycle(self.sampler)
            if self.reference_model is not None:
                self.reference_builder = self._builder(self.train_set, self.objective.reference_roles)
            elif self.reference_values is not None:
                self.reference_values = constant_reference_values(
                    self.train_set, self.objective.reference_roles)

    return BenchTrainer


def constant_reference_values(dataset, roles) -> dict:
    """{(record, role): value} as a reference cache holds, with a plausible constant."""
    return {(index, role): -2.0 * float(dataset.metadata["max_length"]["short"])
            for index in range(len(dataset)) for role in roles}


def token_budget(prefix: str, raw: dict) -> int:
    """The micro-batch budget that holds exactly one preference group of ``prefix`` for the
    objective's packed roles (policy, and the live reference's), padding included."""
    from megatron_solopo.config import config_from_dict, reference_mode, resolved_objective
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.data.packing import pad_multiple_for

    config = config_from_dict(raw)
    objective = resolved_objective(config)
    parallel = config.parallel
    pad = pad_multiple_for(parallel.context_parallel_size, parallel.tensor_model_parallel_size,
                           parallel.sequence_parallel, fp8=config.precision.fp8 is not None)
    dataset = PreferenceDataset(prefix)
    roles = [tuple(objective.policy_roles)]
    if reference_mode(config) == "live":
        roles.append(tuple(objective.reference_roles))
    return int(max(dataset.group_sizes(list(each), pad).max() for each in roles if each))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or \
        "out of memory" in str(err).lower()


def _free_after_oom(trainer) -> None:
    import torch

    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rank_info() -> dict:
    import torch
    from megatron.core import parallel_state as ps

    return {"rank": torch.distributed.get_rank(), "dp_rank": ps.get_data_parallel_rank(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "cp_rank": ps.get_context_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank()}


def _timed_steps(trainer, warmup: int, steps: int) -> dict:
    times, tokens, flops, losses, skipped = [], 0, 0.0, [], 0
    for index in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        result = trainer.train_step()
        _sync()
        elapsed = time.perf_counter() - start
        skipped += int(result.skipped)
        if index >= warmup:
            times.append(elapsed)
            tokens, flops = result.num_tokens, result.flops
            if "loss" in result.metrics:
                losses.append(result.metrics["loss"])
    return {"step_times_s": times, "num_tokens": tokens, "flops": flops, "losses": losses,
            "skipped_steps": skipped}


def _memory(baseline_rss: int) -> dict:
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "device": "cuda",
                "gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / GIB, 1)}
    peak = peak_rss_bytes()
    return {"peak_memory_gib": (peak - baseline_rss) / GIB, "peak_rss_gib": peak / GIB,
            "baseline_rss_gib": baseline_rss / GIB, "device": "cpu"}


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(baseline_rss: int) -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    # ru_maxrss cannot be reset: on CPU this is the peak of the whole process so far, exact for
    # increasing probes that all fit (the CPU search itself uses a fresh process per probe).
    return (peak_rss_bytes() - baseline_rss) / GIB


def _in_process_search(trainer, spec: dict, baseline_rss: int) -> dict:
    """Increasing long lengths in this process (the GPU search): a probe fits when its step runs
    without running out of memory (caught, memory freed) and its peak is under the budget."""
    import torch

    from bench_step import search_max_length  # benchmarks/ is this script's directory

    search = spec["search"]
    budget = search["budget_gib"]
    if budget is None:
        budget = torch.cuda.get_device_properties(0).total_memory / GIB
    probes = []

    def probe(length: int) -> bool:
        prefix = dataset_prefix(spec["workdir"], length, spec["short_length"],
                                spec["response_length"], spec["num_records"], spec["vocab_size"])
        write_dataset(prefix, long_length=length, short_length=spec["short_length"],
                      response_length=spec["response_length"], num_records=spec["num_records"],
                      vocab_size=spec["vocab_size"])
        trainer.use_dataset(prefix, token_budget(prefix, spec["raw"]))
        _reset_peak()
        start, error = time.perf_counter(), None
        try:
            trainer.train_step()
            _sync()
        except Exception as err:  # noqa: BLE001  (only out-of-memory is expected)
            if not _is_oom(err):
                raise
            error = "out of memory"
        if error:
            _free_after_oom(trainer)
        peak = _peak_gib(baseline_rss)
        fits = error is None and peak <= budget
        probes.append({"long_length": length, "peak_memory_gib": None if error else peak,
                       "fits": fits, "error": error, "seconds": time.perf_counter() - start})
        return fits

    found = search_max_length(probe, start=search["start"], cap=search["cap"],
                              granularity=search["granularity"],
                              deadline=time.monotonic() + search["max_seconds"])
    return dict(found, probes=probes, budget_gib=budget)


def _preload() -> None:
    """Import what building and stepping the trainer imports, so that the RSS baseline taken
    after this excludes libraries."""
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    import megatron_solopo.data.packing  # noqa: F401
    import megatron_solopo.model.build  # noqa: F401
    import megatron_solopo.training.trainer  # noqa: F401


def _each_length(trainer, spec: dict, baseline_rss: int, info: dict) -> list:
    """Timed steps at each of ``spec['lengths']`` in turn, peak memory reset in between (GPU)."""
    rows = []
    for index, length in enumerate(spec["lengths"]):
        if index:
            trainer.use_dataset(length["prefix"], length["token_budget"])
            _reset_peak()
        row = dict(info, long_length=length["long_length"])
        try:
            row.update(_timed_steps(trainer, spec["warmup"], spec["steps"]))
        except Exception as err:  # noqa: BLE001  (only out-of-memory is expected)
            if not _is_oom(err):
                raise
            row["error"] = "out of memory"
            _free_after_oom(trainer)
        row.update(_memory(baseline_rss))
        row["peak_memory_gib"] = _peak_gib(baseline_rss)
        rows.append(row)
    return rows


def run(spec: dict) -> dict:
    """One rank's measurement of one objective (``spec`` from bench_step.py)."""
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    import megatron_solopo  # noqa: F401
    from megatron_solopo.config import config_from_dict

    _preload()
    baseline_rss = current_rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = _trainer_class()(config_from_dict(spec["raw"]))
    out: dict = {}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the resolved config, once per rank
            trainer.setup()
        out.update(_rank_info())
        from megatron_solopo.model.build import resolve_attention_backend

        out["attention_backend"] = resolve_attention_backend(
            trainer.model_config.attention_backend, bf16=trainer.config.precision.bf16)
        if spec["mode"] == "search":
            trainer.train_step()  # allocates the optimizer state before the first probe
            out["search"] = _in_process_search(trainer, spec, baseline_rss)
        elif spec.get("lengths"):
            out["by_length"] = _each_length(trainer, spec, baseline_rss, out)
        else:
            out.update(_timed_steps(trainer, spec["warmup"], spec["steps"]))
    except Exception as err:  # noqa: BLE001
        if not _is_oom(err):
            raise
        out["error"] = "out of memory"
    out.update(_memory(baseline_rss))
    return out


def worker_main(spec_path: str) -> int:
    with open(spec_path) as handle:
        spec = json.load(handle)
    rank = int(os.environ.get("RANK", "0"))
    result = run(spec)
    path = os.path.join(spec["result_dir"], f"rank{rank}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle)
    os.replace(path + ".tmp", path)
    try:
        from megatron_solopo.parallel.distributed import destroy_distributed

        destroy_distributed()
    except Exception:  # noqa: BLE001  (the result is written; tearing down is best effort)
        pass
    sys.stdout.flush()
    return 0
