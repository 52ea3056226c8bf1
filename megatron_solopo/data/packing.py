"""Packing whole preference groups into THD micro-batches (the PackedMicroBatch contract,
data/batch.py).

A micro-batch is a list of groups concatenated sequence by sequence (group order as given; within
a group, roles in the order asked, each role's turns in stored order). Every sequence is padded at
its tail to a multiple of ``pad_multiple`` (``2 * CP``, times TP with sequence parallelism), so it
can be split into the 2*CP load-balanced chunks of context parallelism. Groups are never split:
micro-batches are filled greedily up to a token budget (after padding).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_solopo.data.batch import PackedMicroBatch
from megatron_solopo.data.dataset import PreferenceGroup
from megatron_solopo.roles import Role


def pad_multiple_for(context_parallel_size: int, tensor_model_parallel_size: int,
                     sequence_parallel: bool) -> int:
    return 2 * context_parallel_size * (tensor_model_parallel_size if sequence_parallel else 1)


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def group_num_tokens(group: PreferenceGroup, roles: Sequence[Role], pad_multiple: int) -> int:
    """Tokens the group takes in a pack, padding included."""
    return sum(padded_length(len(tokens), pad_multiple)
               for role in roles for tokens, _ in group.sequences[role])


def plan_micro_batches(group_sizes: Sequence[int], token_budget: int,
                       group_ids: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Greedy, in order: positions of the groups in each micro-batch. A group larger than the
    budget is an error naming the record."""
    plan: list[list[int]] = []
    used = token_budget + 1
    for position, size in enumerate(group_sizes):
        if size > token_budget:
            name = repr(group_ids[position]) if group_ids is not None else f"#{position}"
            raise ValueError(f"record {name} needs {size} tokens (after padding), more than the "
                             f"micro-batch budget data.max_tokens_per_micro_batch={token_budget}; "
                             f"raise the budget (more context parallelism) or truncate the data")
        if used + size > token_budget:
            plan.append([])
            used = 0
        plan[-1].append(position)
        used += size
    return plan


def pack_groups(groups: Sequence[PreferenceGroup], roles: Sequence[Role], pad_multiple: int,
                pad_token_id: int) -> PackedMicroBatch:
    tokens, labels, loss_mask, target_mask, positions = [], [], [], [], []
    cu, lengths, role_tags, group_index = [0], [], [], []
    for g, group in enumerate(groups):
        for role in roles:
            for ids, response in group.sequences[role]:
                length = len(ids)
                padded = padded_length(length, pad_multiple)
                seq_tokens = np.full(padded, pad_token_id, dtype=np.int64)
                seq_tokens[:length] = ids
                # Position t predicts token t+1 of the same sequence; the last real position and
                # the padding have no target.
                seq_labels = np.zeros(padded, dtype=np.int64)
                seq_labels[:length - 1] = ids[1:]
                real = np.zeros(padded, dtype=np.float32)
                real[:length - 1] = 1.0
                is_response = np.zeros(padded, dtype=np.float32)
                is_response[:length - 1] = response[1:]
                tokens.append(seq_tokens)
                labels.append(seq_labels)
                loss_mask.append(is_response)
                target_mask.append(real)
                positions.append(np.arange(padded, dtype=np.int64))
                cu.append(cu[-1] + padded)
                lengths.append(length)
                role_tags.append(role.index)
                group_index.append(g)
    batch = PackedMicroBatch(
        tokens=torch.from_numpy(np.concatenate(tokens)),
        labels=torch.from_numpy(np.concatenate(labels)),
        loss_mask=torch.from_numpy(np.concatenate(loss_mask)),
        target_mask=torch.from_numpy(np.concatenate(target_mask)),
        position_ids=torch.from_numpy(np.concatenate(positions)),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        seq_lengths=torch.tensor(lengths, dtype=torch.int32),
        roles=torch.tensor(role_tags, dtype=torch.int64),
        group_index=torch.tensor(group_index, dtype=torch.int64),
        sample_indices=torch.tensor([group.index for group in groups], dtype=torch.int64),
        sample_ids=[group.record_id for group in groups],
        max_seqlen=max(c1 - c0 for c0, c1 in zip(cu[:-1], cu[1:])),
    )
    return batch


def build_micro_batches(dataset, indices: Sequence[int], roles: Sequence[Role], *,
                        token_budget: int, pad_multiple: int,
                        pad_token_id: int) -> list[PackedMicroBatch]:
    """The records ``indices`` (in order) as packed micro-batches of whole groups."""
    groups = [dataset.get_group(index, roles) for index in indices]
    sizes = [group_num_tokens(group, roles, pad_multiple) for group in groups]
    plan = plan_micro_batches(sizes, token_budget, [group.record_id for group in groups])
    return [pack_groups([groups[i] for i in members], roles, pad_multiple, pad_token_id)
            for members in plan]
