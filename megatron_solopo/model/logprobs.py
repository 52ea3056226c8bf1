"""Per-token log-probs from vocab-parallel logits, and the model forward on a packed micro-batch.

Log-probs never gather the vocabulary: Megatron's ``vocab_parallel_cross_entropy`` reduces the
max, the target logit and the sum of exponentials over the TP group and works in fp32 whatever
the logits' dtype. Our log-prob is its negative.

The LM head runs only where a log-prob is needed. :class:`LogprobHead` replaces GPTModel's
logits/loss step (through its ``output_processor`` hook): it selects the positions of the
micro-batch whose target enters the loss (response tokens, plus context tokens where an
objective asks for them) and computes their logits in chunks under activation checkpointing,
so a 128K-token long context with a 200-token answer costs ``[200, V/TP]`` logits, not
``[128K, V/TP]``. Vocabulary padding (the embedding is padded to a multiple of 128 * TP) is
masked out of the softmax, so log-probs are exactly the unpadded model's and do not depend on TP.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from megatron_solopo.data.batch import PackedMicroBatch

# Logit given to padded vocabulary entries: exp() underflows to 0 in fp32, and it stays finite
# in bf16/fp32 so subtracting the row max cannot produce inf - inf.
_MASKED_LOGIT = -1.0e30
DEFAULT_LOGPROB_CHUNK = 4096


def mask_padded_vocab(vocab_parallel_logits: Tensor, vocab_size: int, tp_rank: int) -> Tensor:
    """Logits of this TP rank's vocab shard with entries ``>= vocab_size`` masked (out of place)."""
    shard = vocab_parallel_logits.shape[-1]
    first = tp_rank * shard
    if first + shard <= vocab_size:
        return vocab_parallel_logits
    ids = torch.arange(first, first + shard, device=vocab_parallel_logits.device)
    return vocab_parallel_logits.masked_fill(ids >= vocab_size, _MASKED_LOGIT)


def token_logprobs(
    vocab_parallel_logits: Tensor,
    labels: Tensor,
    *,
    vocab_size: Optional[int] = None,
    tp_group=None,
    preserve_logits: bool = True,
) -> Tensor:
    """``log p(labels)`` per position, fp32. Logits ``[..., V/TP]`` (this rank's vocab shard).

    ``vocab_parallel_cross_entropy`` upcasts with ``.float()``: a bf16 input gets a new fp32 copy,
    but an fp32 input *is* that copy and is overwritten in place with the softmax. With
    ``preserve_logits`` (default) an fp32 input is cloned first, so the caller's logits survive.
    ``vocab_size``: the unpadded vocabulary; padded entries are excluded from the softmax.
    """
    from megatron.core import parallel_state, tensor_parallel

    if vocab_size is not None:
        if tp_group is None:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
        else:
            tp_rank = torch.distributed.get_rank(tp_group)
        masked = mask_padded_vocab(vocab_parallel_logits, vocab_size, tp_rank)
        preserve_logits = preserve_logits and masked is vocab_parallel_logits
        vocab_parallel_logits = masked
    if preserve_logits and vocab_parallel_logits.dtype == torch.float32:
        vocab_parallel_logits = vocab_parallel_logits.clone()
    cross_entropy = tensor_parallel.vocab_parallel_cross_entropy(
        vocab_parallel_logits, labels, tp_group=tp_group)
    return -cross_entropy.float()


class LogprobHead:
    """GPTModel ``output_processor``: per-token log-probs at selected positions only.

    ``context`` (passed through GPTModel) is a bool mask ``[T_local]`` of the positions whose
    log-prob is needed; the result is fp32 ``[T_local]`` with 0 elsewhere.
    """

    def __init__(self, vocab_size: int, chunk_size: int = DEFAULT_LOGPROB_CHUNK):
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size

    def __call__(self, *, hidden_states: Tensor, output_layer, output_weight, labels: Tensor,
                 context: Tensor, scale_logits=None, config=None, **unused) -> Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                                   gather_from_sequence_parallel_region)

        tp_group = output_layer.tp_group
        # Bypassing ColumnParallelLinear means doing its TP input handling ourselves: gather the
        # sequence-parallel shards (backward reduce-scatters) or mark the input as replicated
        # across TP (backward all-reduces), since each TP rank only sees its vocab shard.
        if output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=tp_group)
        else:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        hidden_states = hidden_states[:, 0]  # [T_local, h]; THD has a dummy batch dimension
        run_forward_pre_hooks(output_layer)
        weight = output_weight if output_weight is not None else output_layer.weight
        tp_rank = torch.distributed.get_rank(tp_group) if tp_group is not None else \
            parallel_state.get_tensor_model_parallel_rank()
        positions = context.nonzero(as_tuple=True)[0]
        targets = labels[0].index_select(0, positions)
        selected = hidden_states.index_select(0, positions)
        pieces = []
        for start in range(0, positions.numel(), self.chunk_size):
            chunk = functools.partial(self._chunk_logprobs, weight=weight, tp_group=tp_group,
                                      tp_rank=tp_rank, scale_logits=scale_logits)
            pieces.append(torch.utils.checkpoint.checkpoint(
                chunk, selected[start:start + self.chunk_size],
                targets[start:start + self.chunk_size], use_reentrant=False))
        out = torch.zeros(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
        if pieces:
            out = out.index_copy(0, positions, torch.cat(pieces))
        # Keep the output attached to the whole graph even where no position is selected (a CP
        # rank may hold no response token of a micro-batch): its backward must still run, because
        # the other CP ranks' attention backward exchanges K/V gradients with it.
        return out + 0.0 * (hidden_states.sum() + weight.sum()).float()

    def _chunk_logprobs(self, hidden: Tensor, targets: Tensor, *, weight, tp_group, tp_rank,
                        scale_logits) -> Tensor:
        # fp32 logits: a bf16 matmul output would round them (~0.1 at |logit| ~ 30) before the
        # fp32 softmax. The fp32 [c, V/TP] chunk is the copy vocab_parallel_cross_entropy made
        # anyway; the fp32 weight copy lives only inside this checkpointed chunk.
        logits = torch.matmul(hidden.float(), weight.float().t())  # [c, V/TP] fp32
        if scale_logits is not None:
            logits = scale_logits(logits)
        logits = mask_padded_vocab(logits, self.vocab_size, tp_rank)
        from megatron.core import tensor_parallel

        return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets, tp_group=tp_group).float()


def run_forward_pre_hooks(module) -> None:
    """Run what calling ``module`` would run before its forward. The head uses the output layer's
    weight without calling the layer, so Megatron DDP's pre-hook, which waits for that weight's
    all-gather under ``overlap_param_gather`` (distributed optimizer), must be run by hand: else
    the matmul races the all-gather and the next step's dispatch finds the handle still open."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, (), {})
        else:
            hook(module, ())


def packed_seq_params(batch: PackedMicroBatch):
    """THD metadata for Megatron. Sequences are tail-padded, and the padded boundaries are passed
    as both the padded and unpadded ``cu_seqlens`` (the same tensor object): pad tokens then count
    as real tail tokens of their sequence, which no real token attends to under causal masking.
    This is Megatron's own choice (pretrain_gpt.py) and keeps TE on its FlashAttention path.
    ``max_seqlen`` is the longest padded sequence, never the pack length T (with several sequences
    that would switch the unfused THD RoPE into its per-pack position mode)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = batch.cu_seqlens.to(torch.int32)
    if batch.shared:
        # Shared-prefix segments: the attention masks and RoPE positions ride along (see
        # model/attention.py); Megatron passes the object through to core attention unchanged.
        from megatron_solopo.model.attention import SharedPrefixSeqParams

        return SharedPrefixSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens,
            max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen,
            branch_bounds=batch.branch_bounds,
            rope_positions=batch.rope_positions().to(batch.tokens.device))
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=batch.max_seqlen,
        max_seqlen_kv=batch.max_seqlen,
    )


def forward_packed(model, batch: PackedMicroBatch, vocab_size: int, *,
                   logprob_mask: Optional[Tensor] = None,
                   chunk_size: int = DEFAULT_LOGPROB_CHUNK) -> Tensor:
    """Run one model chunk on a (CP-local) packed micro-batch.

    On the last pipeline stage the result is the per-token log-prob of each label, fp32
    ``[T_local]``, computed where ``logprob_mask`` is set (default: every real target) and 0
    elsewhere; on other stages it is the hidden states sent to the next stage.
    """
    if logprob_mask is None:
        logprob_mask = batch.target_mask.bool()
    return model(
        input_ids=batch.tokens.unsqueeze(0),
        position_ids=batch.position_ids.unsqueeze(0),
        attention_mask=None,
        labels=batch.labels.unsqueeze(0),
        packed_seq_params=packed_seq_params(batch),
        output_processor=LogprobHead(vocab_size, chunk_size),
        output_processor_context=logprob_mask,
    )


def masked_sequence_sums(values: Tensor, mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sum of ``values * mask`` over the boundaries ``cu_seqlens`` (local ones under
    CP), fp32 ``[S]``."""
    from megatron_solopo.parallel.context_parallel import segment_sum

    return segment_sum(values.float() * mask.float(), cu_seqlens)
