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



def starting_run_config(load: Optional[str], field: str = "checkpoint") -> dict:
    """``run_config.yaml`` of the checkpoint at ``load``, or {} when no path is given. A path that
    holds no checkpoint is an error naming ``field``: silently starting from random weights, or
    planning a default toy model, is never what was meant."""
    from megatron_solopo.training import checkpoint as ckpt

    if not load:
        return {}
    if ckpt.resolve_checkpoint(load) is None:
        raise ValueError(f"{field}={load}: no checkpoint there (no {ckpt.TRACKER_FILE}, and not "
                         f"an iter_*/release directory with metadata.json)")
    return ckpt.read_run_config(load)


def starting_checkpoint(config) -> tuple[Optional[str], dict]:
    """``(path, run_config)`` of the checkpoint a training run starts from.

    ``checkpoint.save`` when it already holds a checkpoint (a requeued or restarted job resumes),
    else ``checkpoint.load`` (which must hold one, unless it is the save directory itself: the
    first run of a job configured to resume from where it saves starts from scratch), else none.
    """
    from megatron_solopo.config import load_is_save
    from megatron_solopo.training import checkpoint as ckpt

    save, load = config.checkpoint.save, config.checkpoint.load
    if save and ckpt.resolve_checkpoint(save) is not None:
        return save, ckpt.read_run_config(save)
    if load_is_save(config):
        return None, {}
    return (load or None), starting_run_config(load, "checkpoint.load")


# Fields that decide the weights' shapes: the user may not set them differently from the starting
# checkpoint's (RoPE base/scaling, context length, dropout, ... may change).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "vocab_size", "add_qkv_bias",
                "untie_embeddings_and_output_weights", "qk_layernorm")


def _shape(model) -> dict:
    values = {name: getattr(model, name) for name in SHAPE_FIELDS}
    values["num_query_groups"] = model.num_query_groups or model.num_attention_heads
    values["kv_channels"] = model.kv_channels or model.hidden_size // model.num_attention_heads
    return values


def merged_model_config(config, start_run_config: dict):
    """The starting checkpoint's architecture with the model fields the user set on top; a set
    field that changes the weights' shapes is refused by name."""
    from megatron_solopo.model.config import ModelConfig

    if not start_run_config.get("model"):
        return config.model
    saved = ModelConfig(**start_run_config["model"])
    fields = dict(start_run_config["model"])
    fields.update({name: getattr(config.model, name)
                   for name in getattr(config, "explicit_model_fields", [])})
    merged = ModelConfig(**fields)
    if saved.vocab_size:
        conflicts = [f"model.{name}={value!r} (checkpoint: {_shape(saved)[name]!r})"
                     for name, value in _shape(merged).items() if value != _shape(saved)[name]]
        if conflicts:
            raise ValueError(f"the model section conflicts with the starting checkpoint's "
                             f"architecture: {', '.join(conflicts)}; remove these fields (the "
                             f"architecture comes from the checkpoint's run_config.yaml)")
    return merged


def run_tokenizer(config, start_run_config: dict, start_path: Optional[str]) -> Optional[str]:
    """The tokenizer a run's data must have been made with: ``tokenizer.tokenizer_model``, else
    the starting checkpoint's (the one its run recorded, or a converted checkpoint's copy in
    ``<checkpoint>/tokenizer``), when it exists on this machine."""
    import os

    if config.tokenizer.tokenizer_model:
        return config.tokenizer.tokenizer_model
    recorded = (start_run_config.get("tokenizer") or {}).get("tokenizer_model")
    candidates = [recorded] if recorded else []
    if start_path:
        candidates.append(os.path.join(start_path, "tokenizer"))
    return next((path for path in candidates if os.path.exists(path)), None)


def resolve_model_config(config, start_run_config: dict, dataset, *,
                         start_path: Optional[str] = None, datasets: tuple = ()):
    """The model to build: the starting checkpoint's architecture with the fields the user set
    on top (e.g. a raised ``rotary_base``), or the config's own; vocab size from the dataset's
    tokenizer. Every dataset (``dataset`` and ``datasets``, e.g. the validation split) must be
    compatible: same tokenizer as the run (see :func:`run_tokenizer`), ids the model embeds."""
    model = merged_model_config(config, start_run_config)
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=int(dataset.metadata["vocab_size"]))
    tokenizer = run_tokenizer(config, start_run_config, start_path)
    source = ("tokenizer.tokenizer_model" if config.tokenizer.tokenizer_model else
              f"the starting checkpoint's tokenizer ({start_path})")
    for each in (dataset, *datasets):
        each.check_compatible(tokenizer, model.vocab_size, source)
    return model


def write_initial_checkpoint(config, output: str):
    """A randomly initialized model (seed ``training.seed``) saved as a ``release`` checkpoint,
    with the dataset's vocabulary and tokenizer recorded in its run_config.yaml."""
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.training import checkpoint as ckpt

    if config.data.train_prefix:
        model = resolve_model_config(config, {}, PreferenceDataset(config.data.train_prefix))
    elif config.model.vocab_size:
        model = config.model
    else:
        raise ValueError("the vocabulary is unknown: set data.train_prefix (a preprocessed dataset: "
                         "its tokenizer decides the vocabulary) or model.vocab_size")
    initialize_distributed(config.parallel, model=model, seed=config.training.seed)
    padded_vocab = model.padded_vocab_size(config.parallel.tensor_model_parallel_size)
    chunks = build_model(model, build_transformer_config(model, config.parallel, config.precision),
                         padded_vocab_size=padded_vocab)
    run_config = {"model": dataclasses.asdict(model), "padded_vocab_size": padded_vocab,
                  "tokenizer": dataclasses.asdict(config.tokenizer),
                  "parallel": dataclasses.asdict(config.parallel)}
    return ckpt.save_checkpoint(output, ckpt.RELEASE, chunks, run_config)
