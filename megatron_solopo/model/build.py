"""Megatron-Core GPTModel construction: Transformer Engine spec when TE imports, else the local
spec with our reference core attention (or FlexAttention, ``attention_backend: flex``).

Only this package knows Megatron module specs. :func:`build_model` returns one GPTModel per
virtual pipeline stage of this rank (a list of one without the interleaved schedule), each
built with the right ``pre_process``/``post_process`` flags.
"""

from __future__ import annotations

import copy
import functools
from typing import Literal, Optional

import torch

from megatron_solopo.model import rope
from megatron_solopo.model.config import ModelConfig

AttentionBackend = Literal["auto", "te", "reference", "flex"]


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """True when Transformer Engine for PyTorch imports and megatron-core can use it."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as mcore_te

        return bool(getattr(mcore_te, "HAVE_TE", True))
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False


def resolve_attention_backend(backend: AttentionBackend, *,
                              bf16: bool = True) -> Literal["te", "reference", "flex"]:
    """``auto`` picks TE where it imports and CUDA is present and the model is bf16 (TE attention
    has no fp32 kernel for packed sequences), else the reference path. ``bf16``: the model's
    precision (``precision.bf16``)."""
    from megatron_solopo.model.setup_checks import check_te_attention_precision

    if backend == "auto":
        return "te" if te_available() and torch.cuda.is_available() and bf16 else "reference"
    if backend not in ("te", "reference", "flex"):
        raise ValueError(f"attention_backend={backend!r}; valid: auto, te, reference, flex")
    if backend == "te":
        if not te_available():
            raise ValueError("model attention_backend='te' but Transformer Engine is not "
                             "importable here; install megatron-solopo[te] (or use an NGC PyTorch "
                             "container), or set attention_backend='reference'")
        from megatron_solopo.model.config import PrecisionConfig

        check_te_attention_precision(PrecisionConfig(bf16=bf16))
    return backend


def supports_shared_prefix(backend: AttentionBackend, context_parallel_size: int = 1, *,
                           bf16: bool = True) -> bool:
    """Whether the (resolved) attention backend computes shared-prefix segments exactly
    (data.shared_prefix; docs/data.md): the reference and flex backends always; Transformer
    Engine without context parallelism (its CP attention refuses the bottom-right causal masks
    this needs; docs/context_parallel.md)."""
    resolved = resolve_attention_backend(backend, bf16=bf16)
    return resolved in ("reference", "flex") or context_parallel_size == 1


def gpt_layer_spec(backend: Literal["te", "reference", "flex"], qk_layernorm: bool = False):
    """The transformer layer spec for the Llama/Qwen2/Qwen3/Mistral family (RMSNorm, SwiGLU,
    RoPE; with ``qk_layernorm``, Qwen3's per-head RMSNorm on queries and keys)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        from megatron_solopo.model.attention import shared_prefix_te_attention

        spec = copy.deepcopy(
            gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm))
        attention = spec.submodules.self_attention.submodules
        attention.core_attention = shared_prefix_te_attention(attention.core_attention)
        return spec
    from megatron_solopo.model.attention import FlexCoreAttention, ReferenceCoreAttention
    from megatron_solopo.parallel.cpu_compat import allow_sequence_parallel_torch_norm

    # The local spec's RMSNorm (torch's) refuses sequence parallelism although its math is the
    # same under it; the patch marks its weights for the TP all-reduce of their gradients.
    allow_sequence_parallel_torch_norm()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                    qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = (
        FlexCoreAttention if backend == "flex" else ReferenceCoreAttention)
    return spec


def unwrap_model(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def build_model(
    model: ModelConfig,
    transformer_config,
    *,
    attention_backend: Optional[AttentionBackend] = None,
    padded_vocab_size: Optional[int] = None,
) -> list:
    """This rank's model chunks (GPTModel), one per virtual pipeline stage.

    Process groups must exist (``initialize_distributed``). ``padded_vocab_size`` defaults to
    the model vocab rounded up to ``make_vocab_size_divisible_by * TP``; ``attention_backend``
    defaults to ``model.attention_backend``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    backend = resolve_attention_backend(attention_backend or model.attention_backend,
                                        bf16=bool(transformer_config.bf16))
    if backend != "te" and transformer_config.fp8:
        raise ValueError("fp8 needs the Transformer Engine attention/linear layers "
                         "(attention_backend='te')")
    spec = gpt_layer_spec(backend, qk_layernorm=model.qk_layernorm)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if padded_vocab_size is None:
        padded_vocab_size = model.padded_vocab_size(tp)
    rope_scaling = model.rope_scaling or {}
    scaling_type = rope.scaling_type(model.rope_scaling)
    if scaling_type == "yarn" and transformer_config.softmax_scale is None and \
            rope.softmax_scale(rope_scaling, model.kv_channels, model.max_position_embeddings):
        raise ValueError("model.rope_scaling is YaRN, whose attention factor lives in the "
                         "TransformerConfig's softmax_scale; build it with "
                         "build_transformer_config (or set softmax_scale)")
    vpp = transformer_config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        block_spec = spec
        if backend == "reference":
            # Megatron builds the final norm as TENorm whenever TE imports, whatever the layer
            # spec: name the layers' own norm so the reference path has no TE module at all.
            num_layers = get_num_layers_to_build(
                transformer_config, vp_stage=stage,
                pp_rank=parallel_state.get_pipeline_model_parallel_rank())
            block_spec = TransformerBlockSubmodules(layer_specs=[spec] * num_layers,
                                                    layer_norm=spec.submodules.input_layernorm)
        gpt = GPTModel(
            config=transformer_config,
            transformer_layer_spec=block_spec,
            vocab_size=padded_vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            seq_len_interpolation_factor=(float(rope_scaling["factor"])
                                          if scaling_type == "linear" else None),
            vp_stage=stage,
        )
        if scaling_type in ("llama3", "yarn") and hasattr(gpt, "rotary_pos_emb"):
            # Megatron's rotary module makes the per-position angles (per packed sequence, per CP
            # rank) from inv_freq; only the frequencies differ (model/rope.py).
            rotary = gpt.rotary_pos_emb
            rotary.inv_freq = rope.scaled_inv_freq(rotary.inv_freq, rope_scaling,
                                                   model.kv_channels, model.rotary_base,
                                                   model.max_position_embeddings)
        if hasattr(gpt, "rotary_pos_emb"):
            from megatron_solopo.model.attention import enable_position_rope

            # Shared-prefix packs carry per-token RoPE positions (a no-op for other packs).
            enable_position_rope(gpt.rotary_pos_emb, transformer_config)
        if torch.cuda.is_available():
            # Megatron-Core creates most parameters on the current device, but modules built from
            # plain torch layers (the local spec's norms, our core attention) stay on the CPU:
            # move the whole chunk, as Megatron-LM's get_model does.
            gpt.cuda(torch.cuda.current_device())
        chunks.append(gpt)
    return chunks
