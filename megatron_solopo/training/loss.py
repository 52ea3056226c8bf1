"""The one place that meets Megatron-Core's loss-scaling contract.

Our objectives return, for each micro-batch, its exact contribution to the global-batch loss:
``sum over its preference groups of L_g / G`` with ``G`` the number of groups in the *global*
batch. Summing that over micro-batches, data-parallel ranks and (for gradients) context-parallel
ranks gives the global mean and its exact gradient. Megatron-Core changes it twice:

1. ``forward_step_calc_loss`` (schedules.py:339-341) multiplies a 2-tuple loss by
   ``cp_size / num_microbatches`` before backward;
2. ``DistributedDataParallel`` pre-scales gradients by ``1 / (dp_size * cp_size)`` and sums them
   over the DP x CP group (distributed_data_parallel.py:210-213).

Every CP rank computes the same loss from CP-summed per-sequence log-probs (the backward of that
sum is the identity, ``parallel/context_parallel.py``), so each rank's gradient is its shard's
share and the shares must be *summed* over CP, not averaged. :func:`undo_megatron_loss_scaling`
multiplies by ``num_microbatches / cp_size`` (undoing 1) and by ``dp_size * cp_size`` (undoing 2),
i.e. by ``num_microbatches * dp_size``. tests/distributed pins it (CP=1 vs CP=2, DP=1 vs DP=2,
one micro-batch vs several).
"""

from __future__ import annotations

from torch import Tensor


def undo_megatron_loss_scaling(
    loss: Tensor,
    *,
    num_microbatches: int,
    data_parallel_size: int,
    context_parallel_size: int,
) -> Tensor:
    """The loss to hand to Megatron's schedule so that gradients equal d(our loss)/d(params)."""
    undo_schedule = num_microbatches / context_parallel_size
    undo_ddp_average = data_parallel_size * context_parallel_size
    return loss * (undo_schedule * undo_ddp_average)
