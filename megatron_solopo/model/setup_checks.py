"""Set-up checks for GPU features (Transformer Engine, FP8, pipeline p2p): what TE or
Megatron-Core would refuse, crash on, or silently get wrong at the first step, refused before
it with a message saying what to change. Pure functions of the config and the installed
versions, so each is tested on CPU; docs/gpu.md lists them with the reason for each.
"""

from __future__ import annotations

import functools
from typing import Optional

from megatron_solopo.model.config import ModelConfig, PrecisionConfig
from megatron_solopo.parallel.layout import ParallelConfig

# Transformer Engine releases that first run each context-parallel communication on THD
# (packed) inputs; earlier ones assert qkv_format != "thd" (attention/dot_product_attention/
# context_parallel.py). "p2p" has always supported THD.
CP_THD_MIN_TE = {"p2p": (0, 0), "a2a": (2, 10), "all_gather": (2, 18)}


@functools.lru_cache(maxsize=1)
def installed_te_version() -> Optional[tuple]:
    """(major, minor) of the importable Transformer Engine, None without one."""
    try:
        import transformer_engine
    except Exception:  # not installed, or a build that does not match this torch/CUDA
        return None
    return parse_version(getattr(transformer_engine, "__version__", "0.0"))


def parse_version(text: str) -> tuple:
    """``"2.9.0.dev0+abc"`` -> ``(2, 9)``."""
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))


@functools.lru_cache(maxsize=1)
def grad_accum_fusion_available() -> bool:
    """Apex's ``fused_weight_gradient_mlp_cuda``, which Megatron's own linear layers (the output
    layer, also under the TE spec) need for ``gradient_accumulation_fusion``."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def check_te_attention_precision(precision: PrecisionConfig) -> None:
    """TE's flash and fused attention run in fp16/bf16 only, and its unfused fallback is disabled
    for THD (through TE 2.10) and for context parallelism (every version): an fp32 model would
    find no attention backend at its first forward."""
    if not precision.bf16:
        raise ValueError("model.attention_backend='te' needs precision.bf16=true: Transformer "
                         "Engine's attention has no fp32 kernel for packed (THD) sequences; set "
                         "precision.bf16=true, or model.attention_backend='reference' (what "
                         "'auto' picks in fp32)")


def check_te_context_parallel(parallel: ParallelConfig, model: ModelConfig,
                              te_version: Optional[tuple]) -> None:
    """``cp_comm_type`` under TE context parallelism, for THD inputs and this TE release; a2a
    also splits each TP rank's heads over CP."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    kind = parallel.cp_comm_type
    if cp == 1:
        return
    if kind == "a2a+p2p":
        raise ValueError("parallel.cp_comm_type='a2a+p2p' needs hierarchical context-parallel "
                         "groups, which megatron-solopo does not create (TE would then attend "
                         "within one CP rank's shard only); use 'p2p' (or 'a2a')")
    needed = CP_THD_MIN_TE[kind]
    if te_version is not None and te_version < needed:
        raise ValueError(f"parallel.cp_comm_type={kind!r} with packed (THD) sequences needs "
                         f"Transformer Engine >= {needed[0]}.{needed[1]}; this one is "
                         f"{te_version[0]}.{te_version[1]}: use cp_comm_type='p2p' or a newer TE")
    if kind == "a2a":
        heads = model.num_attention_heads // tp
        groups = max(model.num_query_groups // tp, 1)
        if heads % cp or groups % cp:
            raise ValueError(f"parallel.cp_comm_type='a2a' splits each TP rank's attention heads "
                             f"over CP={cp}, but a TP rank has {heads} query head(s) and {groups} "
                             f"key/value head(s) (num_attention_heads={model.num_attention_heads}, "
                             f"num_query_groups={model.num_query_groups}, TP={tp}): both must be "
                             f"divisible by CP; use cp_comm_type='p2p'")


def check_fp8_data_parallel(precision: PrecisionConfig, data_parallel_size: int) -> None:
    """FP8 delayed scaling all-reduces amax histories over the data-parallel (x CP) group at every
    grad-enabled forward and backward, but each DP rank packs its own share of a global batch
    into as many micro-batches as it needs: ranks with fewer would leave the others waiting in
    that all-reduce. Current (tensorwise) scaling has no such per-step collective."""
    if precision.fp8 and precision.fp8_recipe == "delayed" and data_parallel_size > 1:
        raise ValueError(f"precision.fp8_recipe='delayed' with data parallelism (DP="
                         f"{data_parallel_size}) can hang: delayed scaling all-reduces amax over "
                         f"the data-parallel ranks at every micro-batch, and their micro-batch "
                         f"counts differ (each packs its own preference groups); set "
                         f"precision.fp8_recipe=tensorwise")


def default_batch_p2p_comm(parallel: ParallelConfig, cuda: bool) -> bool:
    """Batched p2p (one ``batch_isend_irecv``) except where it mismatches messages: on gloo, and
    under the interleaved schedule with PP=2, where a rank's previous and next stage are the same
    peer and NCCL pairs the batch's sends and receives first-in-first-out (activations would
    arrive as gradients). Megatron-LM refuses that combination too."""
    return cuda and not interleaved_with_two_stages(parallel)


def interleaved_with_two_stages(parallel: ParallelConfig) -> bool:
    return bool(parallel.virtual_pipeline_model_parallel_size) \
        and parallel.pipeline_model_parallel_size == 2


def check_transformer_fields(fields: dict, parallel: ParallelConfig) -> None:
    """Megatron knobs set through ``model.transformer_overrides`` that cannot work here."""
    if fields.get("batch_p2p_comm") and interleaved_with_two_stages(parallel):
        raise ValueError("model.transformer_overrides.batch_p2p_comm=true with the interleaved "
                         "schedule and PP=2: the previous and next stage are the same rank, and "
                         "batched sends/receives to one peer are matched in issue order, which "
                         "swaps activations and gradients; remove the override")
    if fields.get("gradient_accumulation_fusion") and not grad_accum_fusion_available():
        raise ValueError("model.transformer_overrides.gradient_accumulation_fusion=true needs "
                         "apex's fused_weight_gradient_mlp_cuda extension (Megatron's output "
                         "layer uses it), which is not importable here; remove the override or "
                         "install apex")
