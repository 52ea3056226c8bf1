"""Wrap model chunks for training: bf16 (Float16Module) and Megatron DDP, grad finalization."""

from __future__ import annotations

from typing import Optional


def wrap_model(model_chunks: list, transformer_config, ddp_config: Optional[object] = None) -> list:
    """Float16Module when bf16, then Megatron-Core DistributedDataParallel around every chunk.

    Also installs Megatron's ``finalize_model_grads`` (DP x CP reduction, TP all-reduce of
    sequence-parallel norm grads, tied-embedding sync across pipeline stages) and ``no_sync`` on
    the config, which the pipeline schedules call.
    """
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.transformer.module import Float16Module

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        if transformer_config.bf16 or transformer_config.fp16:
            chunk = Float16Module(transformer_config, chunk)
        wrapped.append(DistributedDataParallel(
            config=transformer_config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk overlaps its grad reduce with the pipeline's last backward.
            disable_bucketing=index > 0,
        ))
    transformer_config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in wrapped]
    transformer_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_config.overlap_grad_reduce:
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        transformer_config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if ddp_config.overlap_param_gather and ddp_config.use_distributed_optimizer:
        param_sync = [chunk.start_param_sync for chunk in wrapped]
        transformer_config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    return wrapped

