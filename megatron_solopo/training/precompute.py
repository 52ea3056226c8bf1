"""Precompute reference log-probs over a dataset with the frozen model (any parallel layout).

``torchrun ... tools/precompute_reference.py --config run.yaml`` runs the run's reference model
(``reference.checkpoint``, default ``checkpoint.load``, with ``reference.model_overrides``) over
every record of the training set (and the validation set, if any) for the objective's reference
roles, and writes ``<prefix>.reference-<key>.npz`` beside each dataset (the key: a short hash
of the reference checkpoint and ``reference.model_overrides``, so caches of other reference models
on the same data coexist; roles another objective computed into that file are kept).

A target whose cache is already fresh is skipped (a requeued job does not redo the pass): fresh
means that training would accept it (same reference checkpoint fingerprint, same dataset, every
role the objective needs: :meth:`ReferenceCache.check`), that it holds a value for every record
and needed role, and that it was computed with the same model settings (e.g. LongPO's
``rotary_base`` override). Global rank 0 decides and broadcasts, so every rank takes the same
branch. ``force=True`` (``--force``) recomputes anyway.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch.distributed as dist

from megatron_solopo.config import (JobConfig, reference_checkpoint, reference_mode,
                                    resolved_objective)

PREFIX = "[megatron-solopo]"

# Model fields that do not change what the frozen model computes (or are training-only knobs):
# ignored when deciding whether a cache was computed with the same model.
_MODEL_FIELDS_IGNORED = ("transformer_overrides", "attention_backend", "init_method_std",
                         "make_vocab_size_divisible_by")


def cache_staleness(path: str, *, fingerprint: str, dataset, roles: Sequence, model: Optional[dict]
                    = None) -> Optional[str]:
    """None when the cache at ``path`` can be reused as it is, else why it must be (re)computed.

    ``dataset`` is a PreferenceDataset, ``roles`` the objective's reference roles, ``model`` the
    reference model's ``dataclasses.asdict(ModelConfig)`` (None: not compared)."""
    from megatron_solopo.roles import ALL_ROLES
    from megatron_solopo.training.reference import ReferenceCache

    if not Path(path).exists():
        return "no cache yet"
    try:
        cache = ReferenceCache.load(path)
    except Exception as err:  # truncated or foreign file: recompute it
        return f"cannot read it ({type(err).__name__}: {err})"
    problem = cache.problem(fingerprint=fingerprint, dataset_metadata=dataset.metadata, roles=roles)
    if problem:  # exactly what training refuses
        return problem
    meta = cache.metadata
    if cache.logps.shape != (len(dataset), len(ALL_ROLES)) or len(cache.record_ids) != len(dataset):
        return f"partial: {len(cache.record_ids)} records, the dataset has {len(dataset)}"
    if [str(r) for r in cache.record_ids] != [dataset.record_id(i) for i in range(len(dataset))]:
        return "computed on another dataset (record ids differ)"
    for role in roles:
        absent = int(np.isnan(cache.logps[:, role.index]).sum())
        if absent:
            return f"partial: no {role.value} value for {absent} record(s)"
    if model is not None and isinstance(meta.get("model"), dict):
        current = json.loads(json.dumps(model, default=str))
        changed = [f"{key}: {meta['model'][key]!r} -> {current[key]!r}"
                   for key in sorted(set(current) & set(meta["model"]))
                   if key not in _MODEL_FIELDS_IGNORED and meta["model"][key] != current[key]]
        if changed:
            return f"computed with other model settings ({'; '.join(changed)})"
    return None


def precompute_reference(config: JobConfig, output: Optional[str] = None,
                         force: bool = False) -> list[str]:
    """Compute (or keep, when fresh and not ``force``) the reference caches of the training and
    validation sets; returns their paths (empty when the run needs no precomputed reference)."""
    from megatron.core import parallel_state

    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.data.packing import pad_multiple_for
    from megatron_solopo.parallel.distributed import detect_distributed_env, initialize_distributed
    from megatron_solopo.training.batches import (MicroBatchBuilder, min_micro_batches,
                                                  use_shared_prefix)
    from megatron_solopo.training.model_setup import resolve_model_config, starting_run_config
    from megatron_solopo.training.reference import (ReferenceCache, build_frozen_model,
                                                    checkpoint_fingerprint,
                                                    compute_reference_logps, gather_values,
                                                    run_cache_path)

    objective = resolved_objective(config)
    mode = reference_mode(config)
    if mode in ("none", "live"):
        rank = dist.get_rank() if dist.is_initialized() else detect_distributed_env().rank
        if rank == 0:
            why = ("the objective is reference-free" if mode == "none" else
                   "the trainer computes reference log-probs itself")
            print(f"{PREFIX} nothing to precompute: reference.mode={mode} ({objective.name}; "
                  f"{why})", flush=True)
        return []
    checkpoint = reference_checkpoint(config)
    if not checkpoint:
        raise ValueError("set reference.checkpoint: the frozen model to run (the default, "
                         "checkpoint.load, is unset or is the save directory, which holds the "
                         "trained model once the run has saved)")
    train_set = PreferenceDataset(config.data.train_prefix)
    model_config = resolve_model_config(
        config, starting_run_config(checkpoint, "reference checkpoint"), train_set,
        start_path=checkpoint)
    model_config = dataclasses.replace(model_config, **config.reference.model_overrides)
    initialize_distributed(config.parallel, model=model_config, seed=config.training.seed)
    roles = objective.reference_roles
    targets = [(config.data.train_prefix,
                output or run_cache_path(config, config.data.train_prefix))]
    if config.data.valid_prefix:
        targets.append((config.data.valid_prefix,
                        run_cache_path(config, config.data.valid_prefix)))
    datasets = {prefix: train_set if prefix == config.data.train_prefix else PreferenceDataset(prefix)
                for prefix, _ in targets}

    # Global rank 0 fingerprints the checkpoint and decides for every target; all ranks follow.
    decision = [None, None]
    if dist.get_rank() == 0:
        fingerprint = checkpoint_fingerprint(checkpoint)
        model_dict = dataclasses.asdict(model_config)
        reasons = [("--force" if force else
                    cache_staleness(path, fingerprint=fingerprint, dataset=datasets[prefix],
                                    roles=roles, model=model_dict))
                   for prefix, path in targets]
        decision = [fingerprint, reasons]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    fingerprint, reasons = decision
    if dist.get_rank() == 0:
        for (prefix, path), reason in zip(targets, reasons):
            if reason is None:
                print(f"{PREFIX} reference log-probs {path}: fresh (checkpoint fingerprint "
                      f"{fingerprint[:12]}, dataset {prefix}, roles "
                      f"{', '.join(r.value for r in roles)}), skipped; --force recomputes",
                      flush=True)
            else:
                print(f"{PREFIX} reference log-probs {path}: computing ({reason})", flush=True)
    stale = [(prefix, path) for (prefix, path), reason in zip(targets, reasons) if reason is not None]
    written = [path for (prefix, path), reason in zip(targets, reasons) if reason is None]
    if not stale:
        return written

    padded_vocab = model_config.padded_vocab_size(config.parallel.tensor_model_parallel_size)
    model = build_frozen_model(model_config, config.parallel, config.precision,
                               checkpoint=checkpoint, padded_vocab_size=padded_vocab)
    pad_multiple = pad_multiple_for(config.parallel.context_parallel_size,
                                    config.parallel.tensor_model_parallel_size,
                                    config.parallel.sequence_parallel,
                                    fp8=config.precision.fp8 is not None)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    for prefix, path in stale:
        dataset = datasets[prefix]
        builder = MicroBatchBuilder(dataset, roles,
                                    token_budget=config.data.max_tokens_per_micro_batch,
                                    pad_multiple=pad_multiple,
                                    pad_token_id=int(dataset.metadata["pad_id"]),
                                    fixed_length=config.data.fixed_length_micro_batches,
                                    min_micro_batches=min_micro_batches(config.parallel),
                                    shared_prefix=use_shared_prefix(
                                        config, model_config.attention_backend))
        indices = list(range(dp_rank, len(dataset), dp_size))
        start = time.perf_counter()
        values = compute_reference_logps(model, builder, indices, roles,
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
                    "roles": [role.value for role in roles],
                    "objective": config.objective,
                    "model": dataclasses.asdict(model_config),
                    "dataset": {key: dataset.metadata.get(key)
                                for key in ("source_hash", "num_records", "tokenizer")},
                })
                cache = cache.merged_with(path, dataset.metadata)  # keep other objectives' roles
                cache.save(path)
                print(f"{PREFIX} reference log-probs for {len(dataset)} records "
                      f"({', '.join(r.value for r in roles)}) -> {path} in "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
        written.append(path)
        if dist.is_initialized():
            dist.barrier()
    return written
