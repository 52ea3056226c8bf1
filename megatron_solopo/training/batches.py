"""From dataset records to this rank's micro-batches of one step, and from per-sequence log-probs
back to one value per (preference group, role) for the objective."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from megatron_solopo.data.batch import PackedMicroBatch
from megatron_solopo.roles import Role


@dataclasses.dataclass
class StepData:
    """What one rank needs for one optimizer step."""

    micro_batches: list[PackedMicroBatch]
    num_groups: int  # preference groups in the GLOBAL batch (the loss normalizer)
    num_tokens: int  # real tokens of this rank's micro-batches (throughput)


def min_micro_batches(parallel) -> int:
    """Megatron's interleaved schedule needs at least PP micro-batches per step."""
    return parallel.pipeline_model_parallel_size if parallel.virtual_pipeline_model_parallel_size else 1


def check_groups_per_rank(config, dp_size: int) -> None:
    """Each data-parallel rank's share of a global batch can make the micro-batches the schedule
    needs (one group each at least)."""
    per_rank = config.training.global_batch_size // dp_size
    needed = min_micro_batches(config.parallel)
    if per_rank < needed:
        raise ValueError(f"training.global_batch_size={config.training.global_batch_size} gives "
                         f"{per_rank} preference group(s) per data-parallel rank (DP={dp_size}), but "
                         f"the interleaved pipeline schedule needs at least "
                         f"PP={config.parallel.pipeline_model_parallel_size} micro-batches per step: "
                         f"raise the global batch size")


class MicroBatchBuilder:
    """Packs this data-parallel rank's share of each global batch into micro-batches."""

    def __init__(self, dataset, roles: Sequence[Role], *, token_budget: int, pad_multiple: int,
                 pad_token_id: int, fixed_length: bool, min_micro_batches: int = 1,
                 shared_prefix: bool = False):
        self.dataset = dataset
        self.shared_prefix = shared_prefix
        self.roles = tuple(roles)
        self.token_budget = token_budget
        self.pad_multiple = pad_multiple
        self.pad_token_id = pad_token_id
        self.fixed_length = fixed_length
        self.min_micro_batches = min_micro_batches
        if fixed_length and token_budget % pad_multiple != 0:
            raise ValueError(f"data.max_tokens_per_micro_batch={token_budget} must be a multiple of "
                             f"{pad_multiple} (2*CP, times TP with sequence parallelism) with "
                             f"data.fixed_length_micro_batches")
        self.check_budget()

    def check_budget(self) -> None:
        """Every record of the dataset fits one micro-batch: checked once from the index, so an
        over-long record stops the run at start, not hours into it."""
        roles = self.roles
        if self.shared_prefix:
            # A shared segment is longer than its chosen sequence, so leaving out the rejected
            # sequences that pair with a chosen one gives a lower bound read from the index alone;
            # packing checks each group's exact size (naming the record) when it meets it.
            roles = tuple(role for role in roles if not (
                role.response == "rejected" and Role(f"{role.context}/chosen") in roles))
        sizes = self.dataset.group_sizes(roles, self.pad_multiple)
        over = np.nonzero(sizes > self.token_budget)[0]
        if len(over):
            worst = int(over[np.argmax(sizes[over])])
            raise ValueError(
                f"{len(over)} record(s) of {self.dataset.path_prefix} do not fit one micro-batch: "
                f"the largest, {self.dataset.record_id(worst)!r}, needs "
                f"{'at least ' if self.shared_prefix else ''}{int(sizes[worst])} tokens "
                f"(roles {', '.join(map(str, self.roles))}, padding included), more than "
                f"data.max_tokens_per_micro_batch={self.token_budget}; a preference group is never "
                f"split: raise the budget (with more context parallelism) or re-run "
                f"tools/preprocess_data.py with --max-long-length/--max-short-length")

    def build(self, indices: Sequence[int], num_groups_global: int) -> StepData:
        from megatron_solopo.data.packing import build_micro_batches

        batches = build_micro_batches(self.dataset, list(indices), self.roles,
                                      token_budget=self.token_budget,
                                      pad_multiple=self.pad_multiple,
                                      pad_token_id=self.pad_token_id,
                                      min_micro_batches=self.min_micro_batches,
                                      shared_prefix=self.shared_prefix)
        if self.fixed_length:
            batches = [batch.padded_to(self.token_budget) for batch in batches]
        num_tokens = sum(int(batch.seq_lengths.sum()) for batch in batches)
        return StepData(batches, num_groups_global, num_tokens)


def use_shared_prefix(config, attention_backend: str) -> bool:
    """Whether packing shares prefixes: ``data.shared_prefix`` and an attention backend that
    computes it exactly in this layout (reference, flex; Transformer Engine without context
    parallelism). Elsewhere packing stays unshared: same results, no saving."""
    from megatron_solopo.model.build import supports_shared_prefix

    return bool(config.data.shared_prefix) and supports_shared_prefix(
        attention_backend, config.parallel.context_parallel_size, bf16=config.precision.bf16)


def group_role_values(values: Tensor, batch: PackedMicroBatch, role: Role) -> Tensor:
    """Sum per (group, role) of a per-sequence tensor ``[S]`` -> ``[G]``. Several sequences of one
    role in a group (multi-turn references) add up."""
    selected = batch.roles.to(values.device) == role.index
    groups = batch.group_index.to(values.device)[selected]
    out = torch.zeros(batch.num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, groups, values[selected])


def logprob_positions(batch: PackedMicroBatch, whole_sequence_roles: Sequence[Role]) -> Tensor:
    """Bool mask of the positions whose log-prob the objective needs: response targets, plus every
    real target of the sequences whose role needs the whole sequence (LongPO's NLL)."""
    needed = batch.loss_mask.bool()
    if whole_sequence_roles:
        per_sequence = torch.zeros(batch.num_sequences, dtype=torch.bool)
        for role in whole_sequence_roles:
            per_sequence |= batch.roles.cpu() == role.index
        per_token = batch.tokens_of_sequences(per_sequence).to(needed.device)
        needed = needed | (per_token & batch.target_mask.bool())
    return needed


def cycle(sampler) -> Iterator[list[int]]:
    """Global batches forever (the sampler rolls over epochs itself)."""
    while True:
        yielded = False
        for indices in sampler:
            yielded = True
            yield list(indices)
        if not yielded:
            raise ValueError("the training set yields no complete global batch: it has fewer "
                             "records than training.global_batch_size")


def reference_tensor(values: Optional[dict], batch: PackedMicroBatch, role: Role) -> Tensor:
    """Reference log-probs of ``role`` for the groups of ``batch`` from a {(sample, role): value}
    lookup (precomputed cache or live pass)."""
    assert values is not None
    rows = []
    for sample in batch.sample_indices.tolist():
        key = (int(sample), role)
        if key not in values:
            raise ValueError(f"no reference log-prob for record {batch.sample_ids[len(rows)]!r} "
                             f"role {role}")
        rows.append(values[key])
    return torch.tensor(rows, dtype=torch.float32)
