"""``--dry-run``: validate a run's config and layout and estimate memory per GPU, on any machine.

The estimate is deliberately simple and says what it counts (docs/training.md): weights, main
gradients and Adam state per GPU from the parameter count of the fullest pipeline stage, plus
activations of the micro-batches a 1F1B stage keeps in flight, plus the LM-head chunk. It is an
order-of-magnitude guide for choosing TP/CP/PP, not a promise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from megatron_solopo.config import JobConfig, reference_mode
from megatron_solopo.parallel.layout import validate_parallel_layout

GIB = 1024 ** 3


def _world_size(explicit: Optional[int]) -> int:
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"--world-size must be >= 1, got {explicit}")
        return explicit
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


# With these model fields set, a dry run plans without the starting checkpoint.
_SHAPE_GIVEN = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")


def _model_for_plan(config: JobConfig, hf_config: Optional[str] = None):
    """The model to plan for: from ``hf_config`` (a Hugging Face ``config.json`` or its
    directory) when given, else the starting checkpoint's run_config.yaml, else the config's
    model section; the model fields the config sets go on top in every case."""
    from megatron_solopo.training.model_setup import merged_model_config, starting_checkpoint

    if hf_config:
        model = merged_model_config(config, {"model": dataclasses.asdict(_hf_model(hf_config))})
    else:
        try:
            start = starting_checkpoint(config)[1]
        except ValueError as err:
            if not set(_SHAPE_GIVEN) <= set(getattr(config, "explicit_model_fields", [])):
                raise ValueError(f"{err}. A dry run needs only the model's shape: pass "
                                 f"--hf-config <Hugging Face model directory or config.json> (the "
                                 f"model the checkpoint is or will be converted from), or set "
                                 f"model.{', model.'.join(_SHAPE_GIVEN)} (and model.vocab_size)"
                                 ) from None
            start = {}  # the model section (file or flags) describes the model
        model = merged_model_config(config, start)
    if model.vocab_size == 0 and config.data.train_prefix:
        import json

        sidecar = config.data.train_prefix + ".json"
        if os.path.exists(sidecar):
            with open(sidecar) as handle:
                model = dataclasses.replace(model, vocab_size=int(json.load(handle)["vocab_size"]))
    if model.vocab_size == 0:
        raise ValueError("model.vocab_size is unknown: set it, or point data.train_prefix at a "
                         "preprocessed dataset")
    return model


def _hf_model(path: str):
    from pathlib import Path

    from megatron_solopo.convert.hf_config import model_config_from_hf
    from megatron_solopo.convert.hf_io import read_json

    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ValueError(f"--hf-config {path}: no config.json there")
    return model_config_from_hf(read_json(file), str(file))


def stage_parameters(config: JobConfig, model, padded_vocab: int) -> int:
    """Parameters held by one GPU of the fullest pipeline stage."""
    parallel = config.parallel
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    h, f = model.hidden_size, model.ffn_hidden_size
    q = model.num_attention_heads * model.kv_channels
    kv = model.num_query_groups * model.kv_channels
    per_layer = (h * (q + 2 * kv) + q * h + 3 * h * f) / tp + 2 * h
    layers = model.num_layers // pp * per_layer
    embedding = padded_vocab * h / tp
    if pp == 1:
        return int(layers + embedding + h + (embedding if model.untie_embeddings_and_output_weights else 0))
    # The last stage always holds an output layer (a synchronized copy when embeddings are tied).
    first, last = layers + embedding, layers + h + embedding
    return int(max(first, last))


def memory_estimate(config: JobConfig, world_size: Optional[int] = None,
                    hf_config: Optional[str] = None) -> dict:
    """The ``--dry-run`` plan as numbers: the layout checks, then each memory term per GPU in
    bytes (``weights``, ``grads``, ``optimizer``, ``activations``, ``head``, ``reference``,
    ``total``) and what they were computed from. ``hf_config``: see :func:`_model_for_plan`."""
    model = _model_for_plan(config, hf_config)
    parallel = config.parallel
    world = _world_size(world_size)
    dp = validate_parallel_layout(parallel, world, num_layers=model.num_layers,
                                  num_attention_heads=model.num_attention_heads,
                                  num_query_groups=model.num_query_groups)
    if config.training.global_batch_size % dp != 0:
        raise ValueError(f"training.global_batch_size={config.training.global_batch_size} is not "
                         f"divisible by the data-parallel size {dp}")
    from megatron_solopo.training.batches import check_groups_per_rank

    check_groups_per_rank(config, dp)
    from megatron_solopo.model import setup_checks

    setup_checks.check_fp8_data_parallel(config.precision, dp)
    if model.attention_backend != "reference":  # TE's own rules (those of any TE release)
        setup_checks.check_te_context_parallel(config.parallel, model, te_version=None)
    tp, cp, pp = (parallel.tensor_model_parallel_size, parallel.context_parallel_size,
                  parallel.pipeline_model_parallel_size)
    padded_vocab = model.padded_vocab_size(tp)
    per_gpu = stage_parameters(config, model, padded_vocab)
    param_bytes = 2 if config.precision.bf16 else 4
    distributed = bool(config.optimizer.get("use_distributed_optimizer"))
    grad_bytes = 4 if config.ddp.get("grad_reduce_in_fp32", True) or not config.precision.bf16 else 2
    optimizer_bytes = (4 if config.precision.bf16 else 0) + 8  # fp32 main copy + Adam m, v
    weights = per_gpu * param_bytes
    tokens = config.data.max_tokens_per_micro_batch / cp
    sp_divisor = tp if parallel.sequence_parallel else 1
    recompute = model.transformer_overrides.get("recompute_granularity")
    # Per layer and token: ~34*h bytes without recompute (Korthikanti et al. 2022, attention
    # scores not stored thanks to flash attention), ~2*h with full recompute (layer inputs only).
    per_token_layer = (2 if recompute == "full" else 34) * model.hidden_size / sp_divisor
    in_flight = pp  # 1F1B: the first stage holds up to PP micro-batches of activations
    terms = {
        "weights": weights,
        "grads": per_gpu * grad_bytes,
        "optimizer": per_gpu * optimizer_bytes / (dp if distributed else 1),
        "activations": tokens * per_token_layer * (model.num_layers // pp) * in_flight,
        # fp32 logits, their masked copy and gradient, plus the fp32 copy of the output weight.
        "head": (config.training.logprob_chunk_size * padded_vocab / tp * (4 + 4 + 4)
                 + padded_vocab / tp * model.hidden_size * 4),
        # A live reference is a frozen copy of the weights, forward only.
        "reference": weights if reference_mode(config) == "live" else 0.0,
    }
    terms["total"] = sum(terms.values())
    return dict(terms, model=model, world=world, dp=dp, padded_vocab=padded_vocab,
                per_gpu_parameters=per_gpu, param_bytes=param_bytes, grad_bytes=grad_bytes,
                distributed=distributed, tokens=tokens, in_flight=in_flight, recompute=recompute)


def dry_run(config: JobConfig, world_size: Optional[int] = None,
            hf_config: Optional[str] = None) -> str:
    plan = memory_estimate(config, world_size, hf_config)
    model, parallel = plan["model"], config.parallel
    total = model.num_parameters(model.vocab_size)

    def row(label: str, value: float) -> str:
        return f"  {label:<58s} {value / GIB:8.2f} GiB"

    lines = [
        f"layout: {parallel.describe(plan['world'])} (data-parallel size {plan['dp']})",
        f"model: {model.family}, {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} KV heads, vocab "
        f"{model.vocab_size} (padded {plan['padded_vocab']})",
        f"parameters: {total:,} total (unpadded vocabulary), {plan['per_gpu_parameters']:,} on the "
        f"fullest GPU",
        f"objective: {config.objective.get('name')} | reference: {reference_mode(config)}",
        "memory per GPU (estimate):",
        row(f"weights ({plan['param_bytes']} B/param)", plan["weights"]),
        row(f"main gradients ({plan['grad_bytes']} B/param)", plan["grads"]),
        row("optimizer state" + (" (distributed over DP)" if plan["distributed"] else ""),
            plan["optimizer"]),
        row(f"activations ({int(plan['tokens'])} tokens/GPU/micro-batch, {plan['in_flight']} in "
            f"flight, recompute={plan['recompute'] or 'none'})", plan["activations"]),
        row(f"LM head chunk ({config.training.logprob_chunk_size} positions)", plan["head"]),
    ]
    if plan["reference"]:
        lines.append(row("live reference weights", plan["reference"]))
    lines.append(row("total", plan["total"]))
    return "\n".join(lines)
