"""Precompute reference log-probs over a dataset with the frozen model (any parallel layout).

``torchrun ... tools/precompute_reference.py --config run.yaml`` runs the run's reference model
(``reference.checkpoint``, default ``checkpoint.load``, with ``reference.model_overrides``) over
every record of the training set (and the validation set, if any) for the objective's reference
roles, and writes ``<prefix>.reference.npz`` beside each dataset.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch.distributed as dist

from megatron_solopo.config import JobConfig, resolved_objective


def precompute_reference(config: JobConfig, output: Optional[str] = None) -> list[str]:
    from megatron.core import parallel_state

    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.data.packing import pad_multiple_for
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.training.batches import MicroBatchBuilder
    from megatron_solopo.training.model_setup import resolve_model_config, starting_run_config
    from megatron_solopo.training.reference import (ReferenceCache, build_frozen_model,
                                                    checkpoint_fingerprint,
                                                    compute_reference_logps, default_cache_path,
                                                    gather_values)

    objective = resolved_objective(config)
    if not objective.needs_reference:
        raise ValueError(f"objective {objective.name!r} is reference-free: nothing to precompute")
    checkpoint = config.reference.checkpoint or config.checkpoint.load
    if not checkpoint:
        raise ValueError("set reference.checkpoint (or checkpoint.load): the frozen model to run")
    train_set = PreferenceDataset(config.data.train_prefix)
    model_config = resolve_model_config(config, starting_run_config(checkpoint), train_set)
    model_config = dataclasses.replace(model_config, **config.reference.model_overrides)
    initialize_distributed(config.parallel, model=model_config, seed=config.training.seed)
    padded_vocab = model_config.padded_vocab_size(config.parallel.tensor_model_parallel_size)
    model = build_frozen_model(model_config, config.parallel, config.precision,
                               checkpoint=checkpoint, padded_vocab_size=padded_vocab)
    fingerprint = checkpoint_fingerprint(checkpoint)
    pad_multiple = pad_multiple_for(config.parallel.context_parallel_size,
                                    config.parallel.tensor_model_parallel_size,
                                    config.parallel.sequence_parallel,
                                    fp8=config.precision.fp8 is not None)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    targets = [(config.data.train_prefix, output or config.reference.cache
                or default_cache_path(config.data.train_prefix))]
    if config.data.valid_prefix:
        targets.append((config.data.valid_prefix, default_cache_path(config.data.valid_prefix)))
    written = []
    for prefix, path in targets:
        dataset = train_set if prefix == config.data.train_prefix else PreferenceDataset(prefix)
        builder = MicroBatchBuilder(dataset, objective.reference_roles,
                                    token_budget=config.data.max_tokens_per_micro_batch,
                                    pad_multiple=pad_multiple,
                                    pad_token_id=int(dataset.metadata["pad_id"]),
                                    fixed_length=config.data.fixed_length_micro_batches)
        indices = list(range(dp_rank, len(dataset), dp_size))
        start = time.perf_counter()
        values = compute_reference_logps(model, builder, indices, objective.reference_roles,
                                         vocab_size=model_config.vocab_size,
                                         logprob_chunk_size=config.training.logprob_chunk_size)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dense = gather_values(values, len(dataset), parallel_state.get_data_parallel_group())
            writer = (parallel_state.get_data_parallel_rank() == 0
                      and parallel_state.get_tensor_model_parallel_rank() == 0
                      and parallel_state.get_context_parallel_rank() == 0)
            if writer:
                cache = ReferenceCache(dense, [dataset.record_id(i) for i in range(len(dataset))], {
                    "checkpoint": str(checkpoint),
                    "checkpoint_fingerprint": fingerprint,
                    "roles": [role.value for role in objective.reference_roles],
                    "objective": config.objective,
                    "model": dataclasses.asdict(model_config),
                    "dataset": {key: dataset.metadata.get(key)
                                for key in ("source_hash", "num_records", "tokenizer")},
                })
                cache.save(path)
                print(f"[megatron-solopo] reference log-probs for {len(dataset)} records "
                      f"({', '.join(r.value for r in objective.reference_roles)}) -> {path} in "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
        written.append(path)
        if dist.is_initialized():
            dist.barrier()
    return written
