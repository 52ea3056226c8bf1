"""Packing whole preference groups into THD micro-batches (the PackedMicroBatch contract in
data/batch.py; docs/data.md "Packing").

A micro-batch is a list of groups concatenated sequence by sequence: groups in the order given,
within a group the roles in the order asked, each role's sequences (turns) in stored order.
Every sequence is padded at its tail to a multiple of ``pad_multiple`` (``2 * CP``, times TP with
sequence parallelism) so that context parallelism can cut it into ``2 * CP`` equal chunks.
Groups are never split: micro-batches are filled greedily, in order, up to a token budget counted
after padding.

With ``shared_prefix``, the chosen and rejected sequences of one context in a group (turn by turn
for multi-turn short roles) are packed as one segment ``[prefix | chosen | rejected]`` whose
prefix is computed once (data/batch.py "Shared-prefix packing"; docs/data.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_solopo.data.batch import PackedMicroBatch
from megatron_solopo.data.dataset import PreferenceGroup
from megatron_solopo.roles import Role


# FP8 GEMMs in Transformer Engine want every dimension a multiple of 16, the token dimension
# included (it is the reduction dimension of the weight-gradient GEMM); Megatron's
# get_fp8_align_size returns 16 for the delayed and tensorwise recipes.
FP8_TOKEN_MULTIPLE = 16


def pad_multiple_for(context_parallel_size: int, tensor_model_parallel_size: int,
                     sequence_parallel: bool, fp8: bool = False) -> int:
    """Every sequence's padded length is a multiple of this: CP splits a sequence into ``2 * CP``
    load-balanced chunks, and sequence parallelism splits each CP rank's tokens over TP. With
    FP8, each rank's share of every sequence (``L / (CP * TP_sp)`` tokens, cast to FP8 before
    sequence-parallel all-gathers) is also a multiple of 16, so any packed micro-batch is."""
    shards = context_parallel_size * (tensor_model_parallel_size if sequence_parallel else 1)
    return (FP8_TOKEN_MULTIPLE if fp8 else 2) * shards


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def _group_sequences(group: PreferenceGroup, roles: Sequence[Role]) -> list:
    """``[(role, tokens, response_mask)]`` in packing order."""
    out = []
    for role in roles:
        if role not in group.sequences:
            raise ValueError(f"record {group.record_id!r}: no {role} sequence in this group "
                             f"(get_group was asked for {', '.join(map(str, group.sequences))})")
        out.extend((role, tokens, mask) for tokens, mask in group.sequences[role])
    return out


def shared_prefix_length(first: tuple, second: tuple) -> int:
    """Tokens two sequences ``(tokens, response_mask)`` can share as a prefix: up to one before
    the first position where their tokens or response masks differ, so that the prefix's last
    position predicts a token both have (each position keeps exactly one target). 0 = none."""
    (tokens_a, mask_a), (tokens_b, mask_b) = first, second
    length = min(len(tokens_a), len(tokens_b))
    differ = (np.asarray(tokens_a[:length]) != np.asarray(tokens_b[:length])) | \
        (np.asarray(mask_a[:length], dtype=bool) != np.asarray(mask_b[:length], dtype=bool))
    common = int(np.argmax(differ)) if differ.any() else length
    return max(common - 1, 0)


def _units(sequences: list, shared_prefix: bool) -> list[tuple]:
    """Physical segments of one group: ``(first, second, prefix)`` where ``first``/``second``
    are positions in ``sequences`` (``second`` None: unshared) and ``prefix`` the shared length.
    Pairs are ``<context>/chosen`` turn k with ``<context>/rejected`` turn k."""
    if not shared_prefix:
        return [(i, None, 0) for i in range(len(sequences))]
    by_role: dict = {}
    for position, (role, _, _) in enumerate(sequences):
        by_role.setdefault(role, []).append(position)
    partner = {}
    for role, positions in by_role.items():
        if role.response != "chosen":
            continue
        rejected = by_role.get(Role(f"{role.context}/rejected"), [])
        if len(rejected) != len(positions):
            continue
        for chosen_at, rejected_at in zip(positions, rejected):
            prefix = shared_prefix_length(sequences[chosen_at][1:], sequences[rejected_at][1:])
            if prefix > 0:
                partner[chosen_at] = (rejected_at, prefix)
    paired = {rejected for rejected, _ in partner.values()}
    units = []
    for position in range(len(sequences)):
        if position in partner:
            units.append((position, *partner[position]))
        elif position not in paired:
            units.append((position, None, 0))
    return units


def _unit_length(sequences: list, unit: tuple) -> int:
    first, second, prefix = unit
    length = len(sequences[first][1])
    return length if second is None else length + len(sequences[second][1]) - prefix


def group_num_tokens(group: PreferenceGroup, roles: Sequence[Role], pad_multiple: int,
                     shared_prefix: bool = False) -> int:
    """Tokens the group takes in a pack, padding included."""
    sequences = _group_sequences(group, roles)
    return sum(padded_length(_unit_length(sequences, unit), pad_multiple)
               for unit in _units(sequences, shared_prefix))


def plan_micro_batches(group_sizes: Sequence[int], token_budget: int,
                       group_ids: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Positions of the groups in each micro-batch: greedy, in order, never splitting a group.
    A group larger than the budget is a ValueError naming its record (``group_ids``) and size."""
    if token_budget < 1:
        raise ValueError(f"token budget must be >= 1, got {token_budget}")
    plan: list[list[int]] = []
    used = token_budget + 1  # forces a new micro-batch for the first group
    for position, size in enumerate(group_sizes):
        if size > token_budget:
            name = repr(group_ids[position]) if group_ids is not None else f"at position {position}"
            raise ValueError(f"record {name} needs {size} tokens (padding included), more than the "
                             f"micro-batch budget data.max_tokens_per_micro_batch={token_budget}; a "
                             f"preference group is never split: raise the budget (with more "
                             f"context parallelism) or re-run tools/preprocess_data.py with "
                             f"--max-long-length/--max-short-length")
        if used + size > token_budget:
            plan.append([])
            used = 0
        plan[-1].append(position)
        used += size
    return plan


def pack_groups(groups: Sequence[PreferenceGroup], roles: Sequence[Role], pad_multiple: int,
                pad_token_id: int, shared_prefix: bool = False) -> PackedMicroBatch:
    """One micro-batch holding ``groups`` (see data/batch.py for every field). ``shared_prefix``:
    chosen/rejected pairs with a common prefix share one segment."""
    if not groups:
        raise ValueError("pack_groups needs at least one group")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    sequences = []  # logical: (group, role, tokens, mask), the order of the unshared layout
    units = []  # physical segments: (first, second, prefix) indexing ``sequences``
    for g, group in enumerate(groups):
        members = _group_sequences(group, roles)
        offset = len(sequences)
        sequences.extend((g, role, tokens, mask) for role, tokens, mask in members)
        for first, second, prefix in _units(members, shared_prefix):
            units.append((offset + first, None if second is None else offset + second, prefix))
    lengths = np.array([len(tokens) for _, _, tokens, _ in sequences], dtype=np.int64)
    if (lengths < 1).any():
        raise ValueError("a sequence is empty")
    unit_lengths = np.array([_unit_length([s[1:] for s in sequences], unit) for unit in units],
                            dtype=np.int64)
    padded = -(-unit_lengths // pad_multiple) * pad_multiple
    cu_seqlens = np.concatenate([[0], np.cumsum(padded)])
    num_tokens = int(cu_seqlens[-1])

    tokens = np.full(num_tokens, pad_token_id, dtype=np.int64)
    labels = np.zeros(num_tokens, dtype=np.int64)
    loss_mask = np.zeros(num_tokens, dtype=np.float32)
    target_mask = np.zeros(num_tokens, dtype=np.float32)
    position_ids = np.zeros(num_tokens, dtype=np.int64)

    def place(at: int, ids, mask, first_position: int) -> None:
        # Position t predicts token t+1 of the same sequence; the last real position has none.
        end = at + len(ids)
        tokens[at:end] = ids
        labels[at:end - 1] = ids[1:]
        target_mask[at:end - 1] = 1.0
        loss_mask[at:end - 1] = mask[1:]
        position_ids[at:end] = np.arange(first_position, first_position + len(ids))

    cu_pieces, piece_sequences, branch_bounds = [0], [], []
    for (first, second, prefix), start, size, real in zip(units, cu_seqlens[:-1], padded,
                                                         unit_lengths):
        ids, mask = sequences[first][2], sequences[first][3]
        end = start + size
        if second is None:
            place(start, ids, mask, 0)
            piece_sequences.append((len(cu_pieces) - 1, first))
            cu_pieces.append(end)
            branch_bounds.append((size, size))
        else:
            other, other_mask = sequences[second][2], sequences[second][3]
            place(start, ids, mask, 0)  # prefix + chosen branch
            split = start + len(ids)  # the rejected branch starts here, at position ``prefix``
            place(split, other[prefix:], other_mask[prefix:], prefix)
            piece = len(cu_pieces) - 1
            piece_sequences += [(piece, first), (piece, second), (piece + 1, first),
                                (piece + 2, second)]
            cu_pieces += [start + prefix, split, end]
            branch_bounds.append((prefix, len(ids)))
        # Padding continues the positions of the segment's last branch.
        tail = start + real
        position_ids[tail:end] = np.arange(1, 1 + end - tail) + position_ids[tail - 1]
    shared = {}
    if any(second is not None for _, second, _ in units):
        shared = dict(
            cu_pieces=torch.tensor(cu_pieces, dtype=torch.int32),
            piece_sequences=torch.tensor(piece_sequences, dtype=torch.int64),
            branch_bounds=torch.tensor(branch_bounds, dtype=torch.int32))
    return PackedMicroBatch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        target_mask=torch.from_numpy(target_mask),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        seq_lengths=torch.from_numpy(lengths.astype(np.int32)),
        roles=torch.tensor([role.index for _, role, _, _ in sequences], dtype=torch.int64),
        group_index=torch.tensor([g for g, _, _, _ in sequences], dtype=torch.int64),
        sample_indices=torch.tensor([group.index for group in groups], dtype=torch.int64),
        sample_ids=[group.record_id for group in groups],
        max_seqlen=int(padded.max()),
        **shared,
    )


def split_to_at_least(plan: list[list[int]], count: int) -> list[list[int]]:
    """``plan`` with its largest micro-batches (by group count) halved until it has ``count``
    micro-batches, or every micro-batch holds one group. Order is kept; budgets still hold."""
    plan = [list(members) for members in plan]
    while len(plan) < count:
        widest = max(range(len(plan)), key=lambda i: len(plan[i]))
        members = plan[widest]
        if len(members) < 2:
            break
        half = len(members) // 2
        plan[widest:widest + 1] = [members[:half], members[half:]]
    return plan


def build_micro_batches(dataset, indices: Sequence[int], roles: Sequence[Role],
                        token_budget: int, pad_multiple: int,
                        pad_token_id: int, min_micro_batches: int = 1,
                        shared_prefix: bool = False) -> list[PackedMicroBatch]:
    """The records ``indices`` of ``dataset`` (in this order) as packed micro-batches of whole
    groups, each at most ``token_budget`` tokens, and at least ``min_micro_batches`` of them when
    there are that many groups (the interleaved pipeline schedule needs >= PP)."""
    groups = [dataset.get_group(index, roles) for index in indices]
    sizes = [group_num_tokens(group, roles, pad_multiple, shared_prefix) for group in groups]
    plan = plan_micro_batches(sizes, token_budget, [group.record_id for group in groups])
    plan = split_to_at_least(plan, min_micro_batches)
    return [pack_groups([groups[i] for i in members], roles, pad_multiple, pad_token_id,
                        shared_prefix) for members in plan]
