"""Reference log-probs: precomputed once (default) or from a live frozen model.

The cache holds, for every record and reference role, the frozen model's ``logp(response |
context)`` (the same masked sum the policy side uses), plus what it was computed from: a
fingerprint of the reference checkpoint, the dataset's identity and the roles. Training refuses
a cache whose fingerprint or dataset does not match. For LongPO the reference roles are the
*short* ones, so precomputing is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_solopo.roles import ALL_ROLES, Role

CACHE_SUFFIX = ".reference.npz"  # the name before caches were keyed (still read)


def default_cache_path(data_prefix: str, settings: Optional[dict] = None) -> str:
    """``<prefix>.reference-<key>.npz``: the key is a short hash of the reference settings (its
    checkpoint path, ``reference.model_overrides``), so caches for other reference models of the
    same dataset sit side by side, and objectives with the same reference share one file, merged
    per role (a LongPO run adds its roles to a SoLoPO run's cache instead of replacing it).
    Staleness (same path, other content) is still checked by fingerprint when the cache is read.
    Without settings: the unkeyed name older versions wrote."""
    if settings is None:
        return data_prefix + CACHE_SUFFIX
    key = json.dumps(settings, sort_keys=True, default=str)
    return f"{data_prefix}.reference-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"


def run_cache_path(config, data_prefix: str) -> str:
    """The cache a run reads and tools/precompute_reference.py writes for ``data_prefix``:
    ``reference.cache`` for the training set when set, else the keyed default."""
    from megatron_solopo.config import reference_checkpoint

    if data_prefix == config.data.train_prefix and config.reference.cache:
        return config.reference.cache
    checkpoint = reference_checkpoint(config)
    settings = {"checkpoint": os.path.realpath(checkpoint) if checkpoint else None,
                "model_overrides": config.reference.model_overrides}
    return default_cache_path(data_prefix, settings)


def cache_to_read(config, data_prefix: str) -> str:
    """:func:`run_cache_path`, or the unkeyed ``<prefix>.reference.npz`` of an older version when
    only that exists (it is checked like any cache)."""
    path = run_cache_path(config, data_prefix)
    legacy = default_cache_path(data_prefix)
    if not Path(path).exists() and not config.reference.cache and Path(legacy).exists():
        return legacy
    return path


def checkpoint_fingerprint(path: str) -> str:
    """Identity of a checkpoint directory without reading all of it: sha256 over every file's
    relative name, size and first/last MiB, and the full ``metadata.json``/``run_config.yaml``."""
    from megatron_solopo.training.checkpoint import resolve_checkpoint

    directory = resolve_checkpoint(path)
    if directory is None:
        raise ValueError(f"reference checkpoint {path} does not exist (no tracker file or "
                         f"checkpoint directory)")
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = file.relative_to(directory).as_posix()
        size = file.stat().st_size
        digest.update(f"{relative}:{size}\n".encode())
        with open(file, "rb") as handle:
            if relative in ("metadata.json", "run_config.yaml") or size <= 2 << 20:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


@dataclasses.dataclass
class ReferenceCache:
    logps: np.ndarray  # [num_records, len(ALL_ROLES)] float64, NaN where not computed
    record_ids: list[str]
    metadata: dict

    def lookup(self) -> dict:
        """{(record index, Role): logp} for every computed entry."""
        values = {}
        rows, cols = np.nonzero(~np.isnan(self.logps))
        for row, col in zip(rows.tolist(), cols.tolist()):
            values[(row, ALL_ROLES[col])] = float(self.logps[row, col])
        return values

    def save(self, path: str) -> None:
        """Atomic: a temporary file renamed over ``path``; leftovers of a killed save go."""
        import glob

        for leftover in glob.glob(glob.escape(path) + ".tmp-*.npz"):
            os.remove(leftover)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, logps=self.logps, record_ids=np.array(self.record_ids, dtype=object),
                 metadata=np.array(json.dumps(self.metadata)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ReferenceCache":
        if not Path(path).exists():
            raise ValueError(f"reference cache {path} does not exist; compute it with "
                             f"tools/precompute_reference.py and the same config and overrides "
                             f"(or set reference.mode=live)")
        try:
            with np.load(path, allow_pickle=True) as data:
                return cls(data["logps"], list(data["record_ids"]),
                           json.loads(str(data["metadata"])))
        except Exception as err:  # truncated, foreign or damaged: np/zipfile/pickle errors
            raise ValueError(f"reference cache {path} cannot be read ({type(err).__name__}: "
                             f"{err}); recompute it with tools/precompute_reference.py "
                             f"--force") from None

    def merged_with(self, path: str, dataset_metadata: dict) -> "ReferenceCache":
        """This cache plus the roles that the cache already at ``path`` holds and this one does
        not, when that one is of the same checkpoint, dataset and records (else this cache)."""
        try:
            existing = ReferenceCache.load(path)
        except ValueError:
            return self
        same = (existing.problem(fingerprint=self.metadata["checkpoint_fingerprint"],
                                 dataset_metadata=dataset_metadata, roles=()) is None
                and [str(r) for r in existing.record_ids] == [str(r) for r in self.record_ids]
                and existing.logps.shape == self.logps.shape)
        if not same:
            return self
        extra = [role for role in existing.metadata.get("roles", [])
                 if role not in self.metadata["roles"]]
        if not extra:
            return self
        logps = self.logps.copy()
        for value in extra:
            column = Role(value).index
            logps[:, column] = existing.logps[:, column]
        roles = sorted(set(self.metadata["roles"]) | set(extra),
                       key=lambda value: Role(value).index)
        return ReferenceCache(logps, self.record_ids, dict(self.metadata, roles=roles))

    def problem(self, *, fingerprint: str, dataset_metadata: dict,
                roles: Sequence[Role]) -> Optional[str]:
        """Why this cache does not belong to the run (None if it does): another reference
        checkpoint, another dataset, or a missing role. Shared by :meth:`check` (training) and
        precompute's freshness test."""
        meta = self.metadata
        if meta.get("checkpoint_fingerprint") != fingerprint:
            return (f"computed from another checkpoint ({meta.get('checkpoint')}, fingerprint "
                    f"{str(meta.get('checkpoint_fingerprint'))[:12]}; now {fingerprint[:12]})")
        for key in ("source_hash", "num_records", "tokenizer"):
            if key in meta.get("dataset", {}) and meta["dataset"][key] != dataset_metadata.get(key):
                return (f"computed on another dataset ({key}: {meta['dataset'][key]!r} vs "
                        f"{dataset_metadata.get(key)!r})")
        missing = [str(r) for r in roles if r.value not in meta.get("roles", [])]
        if missing:
            return f"partial: lacks role(s) {missing} (it has {meta.get('roles')})"
        return None

    def check(self, *, fingerprint: str, dataset_metadata: dict, roles: Sequence[Role],
              path: str) -> None:
        """Refuse a stale cache with a message that says what changed."""
        meta = self.metadata
        if meta.get("checkpoint_fingerprint") != fingerprint:  # the common case, spelled out
            raise ValueError(
                f"reference cache {path} is stale: it was computed from checkpoint "
                f"{meta.get('checkpoint')} (fingerprint {str(meta.get('checkpoint_fingerprint'))[:12]}), "
                f"but the reference model now is a different checkpoint (fingerprint "
                f"{fingerprint[:12]}). Recompute it with tools/precompute_reference.py")
        problem = self.problem(fingerprint=fingerprint, dataset_metadata=dataset_metadata, roles=roles)
        if problem:
            raise ValueError(f"reference cache {path} is stale: {problem}; recompute it with "
                             f"tools/precompute_reference.py")


def gather_values(local: dict, num_records: int, group=None) -> np.ndarray:
    """Merge {(index, role): value} dicts of several ranks into a dense array (NaN elsewhere).
    Every rank of ``group`` must call this."""
    dense = torch.full((num_records, len(ALL_ROLES)), float("nan"), dtype=torch.float64)
    for (index, role), value in local.items():
        dense[index, role.index] = value
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        present = (~torch.isnan(dense)).to(torch.float64)
        filled = torch.nan_to_num(dense, nan=0.0)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        filled, present = filled.to(device), present.to(device)
        dist.all_reduce(filled, group=group)
        dist.all_reduce(present, group=group)
        dense = torch.where(present.cpu() > 0, filled.cpu() / present.cpu().clamp(min=1),
                            torch.tensor(float("nan"), dtype=torch.float64))
    return dense.numpy()


def build_frozen_model(model_config, parallel, precision, *, checkpoint: Optional[str],
                       padded_vocab_size: int, init_from=None) -> list:
    """Model chunks for forward-only use (reference): bf16 wrapper when asked, weights from
    ``checkpoint`` (or copied from the ``init_from`` model chunks), no gradients."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.model.state import gather_full_state_dict, load_full_state_dict
    from megatron_solopo.training.checkpoint import load_checkpoint

    transformer_config = build_transformer_config(model_config, parallel, precision,
                                                  variable_seq_lengths=True)
    chunks = build_model(model_config, transformer_config, padded_vocab_size=padded_vocab_size)
    if transformer_config.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(transformer_config, chunk) for chunk in chunks]
    if checkpoint:
        if load_checkpoint(checkpoint, chunks, padded_vocab_size=padded_vocab_size) is None:
            raise ValueError(f"reference checkpoint {checkpoint} holds no checkpoint")
    elif init_from is not None:
        load_full_state_dict(chunks, gather_full_state_dict(init_from))
    for chunk in chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)
    return chunks


def compute_reference_logps(model_chunks, builder, indices: Sequence[int], roles: Sequence[Role],
                            *, vocab_size: int, logprob_chunk_size: int,
                            batch_size: int = 64) -> dict:
    """{(record index, role): logp(response | context)} for ``indices`` (this rank's share),
    forward only through Megatron's schedule; filled on the last pipeline stage."""
    from megatron_solopo.training.batches import group_role_values
    from megatron_solopo.training.step import forward_backward

    values: dict = {}

    def record(batch, sums):
        for role in roles:
            per_group = group_role_values(sums.response_logps, batch, role)
            present = group_role_values(torch.ones_like(sums.response_logps), batch, role)
            for sample, value, count in zip(batch.sample_indices.tolist(), per_group.tolist(),
                                            present.tolist()):
                if count > 0:
                    values[(int(sample), role)] = value
        return sums.response_logps.sum() * 0.0, {}

    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            step = builder.build(indices[start:start + batch_size], batch_size)
            # Only response log-probs are read: the LM head runs on those positions alone.
            forward_backward(model_chunks, step.micro_batches, record, vocab_size=vocab_size,
                             forward_only=True, logprob_chunk_size=logprob_chunk_size,
                             logprob_mask_fn=lambda batch: batch.loss_mask.bool())
    return values
