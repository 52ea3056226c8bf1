"""Which model to build, and wrapping it for training (bf16, Megatron DDP, grad finalization)."""

from __future__ import annotations

import dataclasses
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



def starting_run_config(load: Optional[str]) -> dict:
    """``run_config.yaml`` of the starting checkpoint (``checkpoint.load``), or {} if none yet."""
    from megatron_solopo.training import checkpoint as ckpt

    if load and ckpt.resolve_checkpoint(load) is not None:
        return ckpt.read_run_config(load)
    return {}


def merged_model_config(config, start_run_config: dict):
    """The starting checkpoint's architecture with the model fields the user set on top."""
    from megatron_solopo.model.config import ModelConfig

    if not start_run_config.get("model"):
        return config.model
    fields = dict(start_run_config["model"])
    fields.update({name: getattr(config.model, name)
                   for name in getattr(config, "explicit_model_fields", [])})
    return ModelConfig(**fields)


def resolve_model_config(config, start_run_config: dict, dataset):
    """The model to build: the starting checkpoint's architecture with the fields the user set
    on top (e.g. a raised ``rotary_base``), or the config's own; vocab size from the dataset's
    tokenizer, which must be compatible with the model's."""
    model = merged_model_config(config, start_run_config)
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=int(dataset.metadata["vocab_size"]))
    dataset.check_compatible(config.tokenizer.tokenizer_model or None, model.vocab_size)
    return model


def write_initial_checkpoint(config, output: str):
    """A randomly initialized model (seed ``training.seed``) saved as a ``release`` checkpoint,
    with the dataset's vocabulary and tokenizer recorded in its run_config.yaml."""
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.training import checkpoint as ckpt

    dataset = PreferenceDataset(config.data.train_prefix)
    model = resolve_model_config(config, {}, dataset)
    initialize_distributed(config.parallel, model=model, seed=config.training.seed)
    padded_vocab = model.padded_vocab_size(config.parallel.tensor_model_parallel_size)
    chunks = build_model(model, build_transformer_config(model, config.parallel, config.precision),
                         padded_vocab_size=padded_vocab)
    run_config = {"model": dataclasses.asdict(model), "padded_vocab_size": padded_vocab,
                  "tokenizer": dataclasses.asdict(config.tokenizer),
                  "parallel": dataclasses.asdict(config.parallel)}
    return ckpt.save_checkpoint(output, ckpt.RELEASE, chunks, run_config)
