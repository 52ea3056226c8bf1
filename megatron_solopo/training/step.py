"""Forward/backward over packed micro-batches inside Megatron-Core's pipeline schedules.

``forward_step`` follows Megatron's contract ``(data_iterator, model) -> (output, loss_func)``:
it shards the micro-batch over context-parallel ranks, runs the model chunk, and on the last
pipeline stage ``loss_func`` turns per-token log-probs into per-sequence sums (summed over CP,
with autograd) and hands them to a loss function of ours. Works unchanged with no pipelining,
1F1B and the interleaved schedule.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_solopo.data.batch import PackedMicroBatch
from megatron_solopo.model.logprobs import (DEFAULT_LOGPROB_CHUNK, forward_packed,
                                            masked_sequence_sums)
from megatron_solopo.parallel import context_parallel as cpar
from megatron_solopo.training.loss import undo_megatron_loss_scaling


@dataclasses.dataclass
class SequenceLogps:
    """Per-sequence values of one packed micro-batch, identical on every CP rank. Shape [S]."""

    response_logps: Tensor  # sum of log-probs over response targets (autograd)
    response_tokens: Tensor  # number of response targets
    target_logps: Tensor  # sum over every real target, context included (autograd)
    target_tokens: Tensor  # number of real targets


# loss_fn(batch, sequence_logps) -> (loss, metrics). The loss is this micro-batch's contribution
# to the global-batch loss (already divided by the global group count); metrics are detached
# scalars with the same additivity.
LossFn = Callable[[PackedMicroBatch, SequenceLogps], tuple[Tensor, dict[str, Tensor]]]


def sequence_logps(token_logps: Tensor, local: PackedMicroBatch, full: PackedMicroBatch,
                   cp_size: int, cp_group) -> SequenceLogps:
    """Per-sequence sums from this CP rank's per-token log-probs ``[T / CP]``. In a shared-prefix
    pack a prefix token counts for both of its sequences (``PackedMicroBatch.sequence_sums``)."""
    if full.shared:
        return _shared_sequence_logps(token_logps, local, full, cp_size, cp_group)
    local_cu = cpar.local_cu_seqlens(local.cu_seqlens.cpu(), cp_size)
    response = masked_sequence_sums(token_logps, local.loss_mask, local_cu)
    target = masked_sequence_sums(token_logps, local.target_mask, local_cu)
    # Token counts need no communication: the full (unsharded) masks are on every rank.
    full_cu = full.cu_seqlens.cpu()
    response_tokens = masked_sequence_sums(torch.ones_like(full.loss_mask), full.loss_mask, full_cu)
    target_tokens = masked_sequence_sums(torch.ones_like(full.target_mask), full.target_mask, full_cu)
    return SequenceLogps(
        response_logps=cpar.sum_over_context_parallel(response, cp_group),
        response_tokens=response_tokens.to(response.device),
        target_logps=cpar.sum_over_context_parallel(target, cp_group),
        target_tokens=target_tokens.to(response.device),
    )


def _shared_sequence_logps(token_logps: Tensor, local: PackedMicroBatch, full: PackedMicroBatch,
                           cp_size: int, cp_group) -> SequenceLogps:
    token_index = None
    if cp_size > 1:
        cp_rank = torch.distributed.get_rank(cp_group)
        token_index = cpar.zigzag_indices(full.cu_seqlens.cpu(), cp_size, cp_rank)
    logps = token_logps.float()
    response = full.sequence_sums(logps * local.loss_mask.float(), token_index)
    target = full.sequence_sums(logps * local.target_mask.float(), token_index)
    return SequenceLogps(
        response_logps=cpar.sum_over_context_parallel(response, cp_group),
        response_tokens=full.sequence_sums(full.loss_mask.float()).to(response.device),
        target_logps=cpar.sum_over_context_parallel(target, cp_group),
        target_tokens=full.sequence_sums(full.target_mask.float()).to(response.device),
    )


@dataclasses.dataclass
class ScheduleInfo:
    num_microbatches: int
    data_parallel_size: int
    context_parallel_size: int
    context_parallel_rank: int
    cp_group: object
    device: torch.device
    vocab_size: int  # unpadded; padded entries are masked out of the softmax
    logprob_chunk_size: int


def schedule_info(num_microbatches: int, vocab_size: int,
                  logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK) -> ScheduleInfo:
    from megatron.core import parallel_state

    return ScheduleInfo(
        num_microbatches=num_microbatches,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        context_parallel_rank=parallel_state.get_context_parallel_rank(),
        cp_group=parallel_state.get_context_parallel_group(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else torch.device("cpu"),
        vocab_size=vocab_size,
        logprob_chunk_size=logprob_chunk_size,
    )


def _loss_func(loss_fn: LossFn, info: ScheduleInfo, full: PackedMicroBatch,
               local: PackedMicroBatch, token_logps: Tensor):
    sums = sequence_logps(token_logps, local, full, info.context_parallel_size, info.cp_group)
    loss, metrics = loss_fn(full, sums)
    metrics = {name: value.detach().float() for name, value in metrics.items()}
    scaled = undo_megatron_loss_scaling(
        loss, num_microbatches=info.num_microbatches,
        data_parallel_size=info.data_parallel_size,
        context_parallel_size=info.context_parallel_size)
    return scaled, metrics


def make_forward_step(loss_fn: LossFn, info: ScheduleInfo,
                      on_token_logps: Optional[Callable[[PackedMicroBatch, Tensor], None]] = None,
                      logprob_mask_fn: Optional[Callable[[PackedMicroBatch], Tensor]] = None):
    """A Megatron ``forward_step_func``. ``on_token_logps(local_batch, logps)`` (optional) sees the
    per-token log-probs on the last stage, e.g. for tests. ``logprob_mask_fn(batch)`` says where
    log-probs are needed (default: every real target); it is applied before the CP split."""

    def forward_step(data_iterator, model):
        full = next(data_iterator).to(info.device)
        local = cpar.shard_micro_batch(full, info.context_parallel_size, info.context_parallel_rank)
        mask = None
        if logprob_mask_fn is not None:
            mask = cpar.shard_tokens(logprob_mask_fn(full), full.cu_seqlens,
                                     info.context_parallel_size, info.context_parallel_rank)
        output = forward_packed(model, local, info.vocab_size, logprob_mask=mask,
                                chunk_size=info.logprob_chunk_size)

        def loss_func(token_logps: Tensor):
            if on_token_logps is not None:
                on_token_logps(local, token_logps.detach())
            return _loss_func(loss_fn, info, full, local, token_logps)

        return output, loss_func

    return forward_step


def forward_backward(
    model_chunks: list,
    micro_batches: list[PackedMicroBatch],
    loss_fn: LossFn,
    *,
    vocab_size: int,
    forward_only: bool = False,
    on_token_logps=None,
    logprob_mask_fn=None,
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK,
) -> list[dict[str, Tensor]]:
    """One pass of Megatron's schedule over this rank's micro-batches; returns the metrics dict of
    each micro-batch (only on the last pipeline stage; an empty list elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    info = schedule_info(len(micro_batches), vocab_size, logprob_chunk_size)
    forward_step = make_forward_step(loss_fn, info, on_token_logps, logprob_mask_fn)
    # Every virtual stage consumes the same micro-batches (each needs cu_seqlens).
    iterators = [iter(micro_batches) for _ in model_chunks]
    max_tokens = max(batch.num_tokens for batch in micro_batches)
    config = get_model_config(model_chunks[0])
    # Packs of different lengths need the pipeline's shape exchange before every send. That
    # exchange is always a batched isend/irecv, which gloo mis-orders when the previous and next
    # stage are the same peer (PP=2, interleaved): pack to a fixed length there.
    config.variable_seq_lengths = any(b.num_tokens != max_tokens for b in micro_batches)
    if (config.variable_seq_lengths and len(model_chunks) > 1
            and torch.distributed.get_backend() == "gloo"):
        raise ValueError("the interleaved pipeline schedule on gloo needs micro-batches of one "
                         "length: pad them to a fixed token count (PackedMicroBatch.padded_to)")
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=max_tokens,  # the schedule divides by CP (and TP with SP) itself
        micro_batch_size=1,
        forward_only=forward_only,
    )
