"""Model architecture (the Llama / Qwen2 / Qwen3 / Mistral family) and its mapping to Megatron-Core.

:class:`ModelConfig` holds what a Hugging Face ``config.json`` holds, in Megatron's field names.
:func:`build_transformer_config` turns it, the parallel layout and the precision into one
Megatron-Core ``TransformerConfig`` (we reuse that dataclass rather than re-declaring its fields;
anything else it accepts can be set through ``transformer_overrides``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

import torch

from megatron_solopo.model import rope
from megatron_solopo.parallel.layout import ParallelConfig

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclasses.dataclass
class ModelConfig:
    family: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    """Architecture family (naming for checkpoint conversion; all share RMSNorm, SwiGLU, RoPE and
    grouped-query attention)."""

    num_layers: int = 2
    """Number of transformer layers."""

    hidden_size: int = 64
    """Model width."""

    ffn_hidden_size: int = 256
    """SwiGLU intermediate size (HF ``intermediate_size``)."""

    num_attention_heads: int = 4
    """Query heads."""

    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention (HF ``num_key_value_heads``); None = MHA."""

    kv_channels: Optional[int] = None
    """Head dimension (HF ``head_dim``); None = hidden_size / num_attention_heads."""

    vocab_size: int = 0
    """Tokenizer vocabulary size, unpadded (0 = take it from the dataset's tokenizer)."""

    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times TP (Megatron's convention)."""

    max_position_embeddings: int = 4096
    """Longest sequence the model is trained on (RoPE table length bound)."""

    rotary_base: float = 10000.0
    """RoPE theta (HF ``rope_theta``). LongPO raises it (e.g. 1e7) for 128K+ windows."""

    rope_scaling: Optional[dict] = None
    """HF-style RoPE scaling: None, ``{"type": "linear", "factor": f}``, ``{"type": "llama3",
    "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
    "original_max_position_embeddings": 8192}`` or ``{"type": "yarn", "factor": 4,
    "original_max_position_embeddings": 32768}`` (optional: ``attention_factor``, ``beta_fast``,
    ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``truncate``; transformers' meaning,
    model/rope.py). Other types are refused."""

    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""

    add_qkv_bias: bool = False
    """Bias on the Q/K/V projections (Qwen2: True)."""

    qk_layernorm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3: True; Megatron's
    ``qk_layernorm``)."""

    untie_embeddings_and_output_weights: bool = True
    """False = the output layer shares the input embedding (HF ``tie_word_embeddings``)."""

    init_method_std: float = 0.02
    """Std of the normal init for a model trained from scratch (ignored when weights are loaded)."""

    attention_backend: Literal["auto", "te", "reference", "flex"] = "auto"
    """Core attention: Transformer Engine (GPU) or our reference implementation (CPU, tests);
    ``auto`` takes TE where it imports, CUDA is present and ``precision.bf16`` is set (TE
    attention has no fp32 kernel for packed sequences; ``te`` in fp32 is refused). ``flex``:
    PyTorch FlexAttention with a block-sparse mask, the fast path on a GPU without TE (CPU:
    forward only)."""

    transformer_overrides: dict = dataclasses.field(default_factory=dict)
    """Extra Megatron-Core ``TransformerConfig`` fields, e.g. ``{"recompute_granularity":
    "full", "recompute_method": "uniform", "recompute_num_layers": 1}``."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not supported; supported: "
                             f"{', '.join(FAMILIES)}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not "
                             f"divisible by model.num_query_groups={self.num_query_groups}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; set "
                                 f"model.kv_channels (the head dimension) explicitly")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            rope.validate_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * TP``."""
        if self.vocab_size < 1:
            raise ValueError("model.vocab_size is not set (it comes from the tokenizer)")
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, padded_vocab_size: int) -> int:
        """Parameter count of the whole (unsharded) model."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        attention += 2 * self.kv_channels if self.qk_layernorm else 0
        mlp = 3 * h * f
        per_layer = attention + mlp + 2 * h
        embeddings = padded_vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        return self.num_layers * per_layer + embeddings + h


@dataclasses.dataclass
class PrecisionConfig:
    bf16: bool = False
    """Parameters and activations in bf16 (fp32 main weights in the optimizer; log-probs and
    losses are always fp32)."""

    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 GEMMs with Transformer Engine (``hybrid``: e4m3 forward, e5m2 backward). Needs TE."""

    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"
    """FP8 scaling: ``delayed`` (amax history) or ``tensorwise`` (current scaling)."""

    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Optional[PrecisionConfig] = None,
    *,
    use_te: Optional[bool] = None,
    **extra: Any,
):
    """One Megatron-Core ``TransformerConfig`` for this model, layout and precision.

    ``extra`` are further TransformerConfig fields set by the caller (the trainer passes
    ``calculate_per_token_loss``, ``variable_seq_lengths``, ...); ``model.transformer_overrides``
    wins over both so a user can always reach any Megatron knob.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_solopo.model import setup_checks
    from megatron_solopo.model.build import resolve_attention_backend

    precision = precision or PrecisionConfig()
    if use_te is None:
        use_te = resolve_attention_backend(model.attention_backend, bf16=precision.bf16) == "te"
    if use_te and parallel.context_parallel_size > 1:
        setup_checks.check_te_context_parallel(parallel, model, setup_checks.installed_te_version())
    if precision.fp8 and not use_te:
        raise ValueError("precision.fp8 needs Transformer Engine (pip install "
                         "'megatron-solopo[te]', or run in an NGC PyTorch container); it is not "
                         "importable here")
    fused = use_te and torch.cuda.is_available()
    vpp = parallel.virtual_pipeline_model_parallel_size
    fields: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        # YaRN's attention factor (model/rope.py); None = 1/sqrt(kv_channels).
        softmax_scale=rope.softmax_scale(model.rope_scaling, model.kv_channels,
                                         model.max_position_embeddings),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        cp_comm_type=parallel.cp_comm_type,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        bf16=precision.bf16,
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        fp8_amax_history_len=precision.fp8_amax_history_len,
        fp8_amax_compute_algo="max",
        bias_activation_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=fused and setup_checks.grad_accum_fusion_available(),
        batch_p2p_comm=setup_checks.default_batch_p2p_comm(parallel, torch.cuda.is_available()),
        # Irrelevant without experts, but the default ("allgather") makes TransformerConfig
        # reject variable_seq_lengths, which packed micro-batches under PP need.
        moe_token_dispatcher_type="alltoall",
    )
    fields.update(extra)
    from megatron_solopo.config import coerce_megatron_fields

    fields.update(coerce_megatron_fields("model.transformer_overrides",
                                         model.transformer_overrides, TransformerConfig))
    setup_checks.check_transformer_fields(fields, parallel)
    return TransformerConfig(**fields)
