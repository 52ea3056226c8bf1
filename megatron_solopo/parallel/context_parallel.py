"""Context parallelism for packed (THD) micro-batches: sharding, gathering, reductions.

This is the only module that knows how a sequence is laid out over context-parallel (CP) ranks.
The layout is Megatron/Transformer Engine's load-balanced one (``thd_get_partitioned_indices``):
every sequence, padded to a multiple of ``2 * CP``, is cut into ``2 * CP`` equal chunks and rank
``r`` keeps chunks ``r`` and ``2 * CP - 1 - r``, so each rank does the same share of causal
attention work. Locally, tokens stay sequence by sequence: sequence ``i`` occupies
``[cu_seqlens[i] / CP, cu_seqlens[i + 1] / CP)`` of the local row, first chunk ``r`` then chunk
``2 * CP - 1 - r``. ``cu_seqlens`` and ``max_seqlen`` stay global (never divided by CP).
docs/context_parallel.md draws it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_solopo.data.batch import PackedMicroBatch

# Per-token fields of PackedMicroBatch that are sharded; the rest is per-sequence metadata.
TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "target_mask", "position_ids")


def _padded_lengths(cu_seqlens: Tensor, cp_size: int) -> list[int]:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for index, length in enumerate(lengths):
        if length % (2 * cp_size) != 0:
            raise ValueError(f"sequence {index} has padded length {length}, not a multiple of "
                             f"2*CP={2 * cp_size}; pack with pad_multiple >= 2*CP")
    return lengths


def zigzag_indices(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Global token indices held by ``cp_rank``, in its local order. Shape ``[T / cp_size]``."""
    lengths = _padded_lengths(cu_seqlens, cp_size)
    starts = cu_seqlens[:-1].tolist()
    pieces = []
    for start, length in zip(starts, lengths):
        chunk = length // (2 * cp_size)
        first = start + cp_rank * chunk
        second = start + (2 * cp_size - 1 - cp_rank) * chunk
        pieces.append(torch.arange(first, first + chunk))
        pieces.append(torch.arange(second, second + chunk))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)


def local_positions(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Position within its own sequence of every local token. Shape ``[T / cp_size]``."""
    global_index = zigzag_indices(cu_seqlens, cp_size, cp_rank)
    sequence = torch.searchsorted(cu_seqlens.to(torch.long), global_index, right=True) - 1
    return global_index - cu_seqlens.to(torch.long)[sequence]


def local_cu_seqlens(cu_seqlens: Tensor, cp_size: int) -> Tensor:
    """Sequence boundaries in a rank's local row (the same on every CP rank)."""
    return torch.div(cu_seqlens, cp_size, rounding_mode="floor")


def shard_tokens(values: Tensor, cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """This rank's part of one per-token tensor ``[T]`` of a pack."""
    if cp_size == 1:
        return values
    index = zigzag_indices(cu_seqlens.cpu(), cp_size, cp_rank).to(values.device)
    return values.index_select(0, index)


def shard_micro_batch(batch: PackedMicroBatch, cp_size: int, cp_rank: int) -> PackedMicroBatch:
    """The part of a packed micro-batch that ``cp_rank`` processes. Labels were shifted on the
    whole pack before this split, so no target crosses a chunk boundary wrongly."""
    if cp_size == 1:
        return batch
    index = zigzag_indices(batch.cu_seqlens, cp_size, cp_rank).to(batch.tokens.device)
    sharded = {name: getattr(batch, name).index_select(0, index) for name in TOKEN_FIELDS}
    return dataclasses.replace(batch, **sharded)


def gather_order(cu_seqlens: Tensor, cp_size: int) -> Tensor:
    """For each global token, its row in the rank-major concatenation of all local shards.

    ``gathered[gather_order(cu, cp)]`` puts an all-gathered ``[cp * T / cp, ...]`` tensor back in
    global order. Shape ``[T]``.
    """
    num_tokens = int(cu_seqlens[-1])
    local = num_tokens // cp_size
    order = torch.empty(num_tokens, dtype=torch.long)
    for rank in range(cp_size):
        order[zigzag_indices(cu_seqlens, cp_size, rank)] = torch.arange(rank * local, (rank + 1) * local)
    return order


def unshard_tokens(local_shards: list[Tensor], cu_seqlens: Tensor) -> Tensor:
    """Inverse of :func:`shard_micro_batch` for one per-token tensor, given every rank's shard."""
    gathered = torch.cat(local_shards, dim=0)
    return gathered.index_select(0, gather_order(cu_seqlens, len(local_shards)).to(gathered.device))


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0; backward reduce-scatters the gradient back to its owner."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "gloo":
            # gloo has no reduce-scatter: an all-reduce followed by this rank's slice is the same.
            dist.all_reduce(grad, group=group)
            return grad.chunk(world, dim=0)[rank].contiguous(), None
        out = torch.empty_like(grad.chunk(world, dim=0)[0])
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def all_gather_context_parallel(tensor: Tensor, group) -> Tensor:
    """``[n, ...]`` on each rank -> ``[world * n, ...]`` in rank order, differentiable."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllGatherFirstDim.apply(tensor, group)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity.

    Every CP rank computes the *same* loss from the summed values, so the incoming gradient is
    already the full dLoss/dsum on each rank. Passing it through unchanged gives each rank's local
    partial sum its gradient exactly once; an all-reduce in backward would count it CP times.
    The per-rank parameter gradients are then summed over CP by the data-parallel reduction
    (see ``training/loss.py``).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sum_over_context_parallel(tensor: Tensor, group) -> Tensor:
    """Sum a per-sequence tensor over the CP group so every rank holds the full values."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _SumOverRanks.apply(tensor, group)


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Sum of ``values[cu[i]:cu[i+1]]`` for every segment ``i``. Shape ``[S]``, dtype of values."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=values.device, dtype=torch.long)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = torch.zeros(lengths.numel(), dtype=values.dtype, device=values.device)
    return out.index_add(0, segment, values)
