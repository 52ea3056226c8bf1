"""RoPE frequency scaling as Hugging Face transformers defines it (``modeling_rope_utils.py``):
Llama 3.1's banded scaling and YaRN, applied on top of Megatron-Core's ``RotaryEmbedding``.

Megatron-Core's rotary module turns ``inv_freq`` into per-position angles for every layout we
run (packed THD sequences restart at position 0, context-parallel ranks take their load-balanced
halves), so a scaled RoPE is only a different ``inv_freq`` plus, for YaRN, an attention factor.

Why not Megatron-Core's ``YarnRotaryEmbedding``: its ``inv_freq`` is the same formula, but
GPTModel reads its settings from ``MLATransformerConfig`` fields a plain ``TransformerConfig``
lacks, it moves tensors to CUDA unconditionally, it has no explicit ``attention_factor``, treats
``mscale_all_dim=0`` differently from transformers, and TE's fused THD RoPE drops its cos/sin
factor. Here the YaRN attention factor multiplies cos and sin in transformers, so it scales every
query and key by ``a`` and every attention logit by ``a**2``: we fold ``a**2`` into the softmax
scale, which every attention backend (TE, ours) and every RoPE kernel honours.

YaRN follows transformers >= 4.56 (``factor`` and ``original_max_position_embeddings`` both
honoured, ``truncate``, ``factor`` derived when null, ``mscale``/``mscale_all_dim``); earlier
releases computed a different model from the same config.json (docs/conversion.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}
# transformers' YaRN defaults (a config may leave these out, or set them to null)
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def scaling_type(rope_scaling: Optional[dict]) -> Optional[str]:
    """``linear``, ``llama3``, ``yarn`` or None (both HF spellings of the key)."""
    if not rope_scaling:
        return None
    return rope_scaling.get("type", rope_scaling.get("rope_type"))


def validate_rope_scaling(rope_scaling: dict, max_position_embeddings: int) -> None:
    """ValueError naming what is wrong with a ``model.rope_scaling`` dict."""
    kind = scaling_type(rope_scaling)
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported: "
                         f"{', '.join(ROPE_SCALING_TYPES)} (or none)")
    unknown = sorted(set(rope_scaling) - {"type", "rope_type"} - set(ROPE_SCALING_KEYS[kind]))
    if unknown:
        raise ValueError(f"model.rope_scaling of type {kind!r} has unknown keys {unknown}; valid: "
                         f"{', '.join(ROPE_SCALING_KEYS[kind])}")
    if kind == "yarn":
        original = rope_scaling.get("original_max_position_embeddings")
        if original is None or int(original) < 1:
            raise ValueError(f"model.rope_scaling of type 'yarn' needs a positive "
                             f"'original_max_position_embeddings' (the pre-YaRN context length), "
                             f"got {rope_scaling!r}")
        factor = yarn_factor(rope_scaling, max_position_embeddings)
    else:
        factor = rope_scaling.get("factor")
    if factor is None or float(factor) <= 0:
        raise ValueError(f"RoPE scaling needs a positive 'factor', got {rope_scaling!r}")


def llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling with the checkpoint's own parameters (megatron-core hard-codes
    low=1, high=4, original=8192, which other checkpoints may not use)."""
    factor = float(rope_scaling["factor"])
    low = float(rope_scaling.get("low_freq_factor", 1.0))
    high = float(rope_scaling.get("high_freq_factor", 4.0))
    original = float(rope_scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_factor(rope_scaling: dict, max_position_embeddings: int) -> float:
    """The YaRN factor; a null one is max_position_embeddings / original_max_position_embeddings
    (DeepSeek-V3's convention, which transformers follows)."""
    factor = rope_scaling.get("factor")
    if factor is None:
        return max_position_embeddings / int(rope_scaling["original_max_position_embeddings"])
    return float(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(rope_scaling: dict, max_position_embeddings: int) -> float:
    """The factor transformers multiplies cos and sin by: ``attention_factor`` when given, else
    from ``factor`` (and ``mscale``/``mscale_all_dim`` when both are non-zero)."""
    explicit = rope_scaling.get("attention_factor")
    if explicit is not None:
        return float(explicit)
    factor = yarn_factor(rope_scaling, max_position_embeddings)
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict,
                  max_position_embeddings: int) -> torch.Tensor:
    """YaRN's blend of interpolated (``/ factor``) and original frequencies over a linear ramp
    between the dimensions that rotate ``beta_fast`` and ``beta_slow`` times within
    ``original_max_position_embeddings`` (bounds rounded outward unless ``truncate`` is false)."""
    factor = yarn_factor(rope_scaling, max_position_embeddings)
    original = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = rope_scaling.get("beta_fast") or YARN_BETA_FAST
    beta_slow = rope_scaling.get("beta_slow") or YARN_BETA_SLOW
    truncate = rope_scaling.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def scaled_inv_freq(inv_freq: torch.Tensor, rope_scaling: Optional[dict], dim: int, base: float,
                    max_position_embeddings: int) -> torch.Tensor:
    """Megatron's default ``inv_freq`` with ``rope_scaling`` applied (linear scaling is Megatron's
    own ``seq_len_interpolation_factor`` and leaves it unchanged)."""
    kind = scaling_type(rope_scaling)
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, rope_scaling)
    if kind == "yarn":
        return yarn_inv_freq(dim, base, rope_scaling, max_position_embeddings).to(inv_freq.device)
    return inv_freq


def softmax_scale(rope_scaling: Optional[dict], kv_channels: int,
                  max_position_embeddings: int) -> Optional[float]:
    """The attention softmax scale: None (Megatron's ``1/sqrt(d)``) unless YaRN's attention
    factor ``a`` scales queries and keys, which multiplies the logits by ``a**2``."""
    if scaling_type(rope_scaling) != "yarn":
        return None
    factor = yarn_attention_factor(rope_scaling, max_position_embeddings)
    return None if factor == 1.0 else factor * factor / math.sqrt(kv_channels)
