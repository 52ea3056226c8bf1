"""Hugging Face ``config.json`` <-> our ModelConfig (Llama, Qwen2, Mistral).

Anything we do not model is refused by name rather than silently converted into a different
model: other architectures, RoPE scaling types other than linear/llama3, sliding-window attention,
biases other than Qwen2's Q/K/V bias, activations other than SiLU.
"""

from __future__ import annotations

from typing import Optional

from megatron_solopo.model.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "MistralForCausalLM": "mistral"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}


def _refuse(source: str, field: str, value, supported: str):
    raise ValueError(f"{source}: {field}={value!r} is not supported ({supported})")


def detect_family(hf: dict, source: str) -> str:
    architectures = hf.get("architectures") or []
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    if architectures:
        _refuse(source, "architectures", architectures, "supported: " + ", ".join(ARCHITECTURES))
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        _refuse(source, "model_type", model_type, "supported: " + ", ".join(MODEL_TYPES))
    return MODEL_TYPES[model_type]


def rope_settings(hf: dict, source: str) -> tuple[float, Optional[dict]]:
    """(theta, scaling) from either spelling: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling``."""
    parameters = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling and not parameters.get("rope_type"):
        parameters.update(scaling)
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(parameters["factor"])}
    if kind == "llama3":
        return theta, {"type": "llama3", "factor": float(parameters["factor"]),
                       "low_freq_factor": float(parameters.get("low_freq_factor", 1.0)),
                       "high_freq_factor": float(parameters.get("high_freq_factor", 4.0)),
                       "original_max_position_embeddings":
                           int(parameters.get("original_max_position_embeddings", 8192))}
    _refuse(source, "rope_scaling.rope_type", kind, "supported: default, linear, llama3")


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    family = detect_family(hf, source)
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", hf["hidden_act"], "only silu (SwiGLU)")
    if hf.get("mlp_bias"):
        _refuse(source, "mlp_bias", True, "MLP projections without bias only")
    if family != "qwen2" and hf.get("attention_bias"):
        _refuse(source, "attention_bias", True, "Q/K/V bias only in the qwen2 family")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", family == "mistral")
    if uses_window and window is not None and window < hf.get("max_position_embeddings", 0):
        _refuse(source, "sliding_window", window,
                "sliding-window attention is not modelled; it must be null or >= "
                "max_position_embeddings")
    theta, scaling = rope_settings(hf, source)
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        family=family,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        add_qkv_bias=family == "qwen2",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
    )


def hf_config_from_model(model: ModelConfig, original: Optional[dict], dtype: str) -> dict:
    """config.json for ``model``: the original HF config (when the model came from one) with
    every architectural field rewritten from ``model``, else a fresh one for its family."""
    from transformers import AutoConfig

    config = dict(original or {})
    config.update({
        "architectures": [FAMILY_ARCHITECTURE[model.family]],
        "model_type": model.family,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "hidden_act": "silu",
        "dtype": dtype,
    })
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.rope_scaling:
        scaling = dict(model.rope_scaling)
        rope.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
    config["rope_parameters"] = rope
    config.pop("rope_scaling", None)
    config.pop("rope_theta", None)
    config.pop("torch_dtype", None)
    if model.family == "mistral":
        config["sliding_window"] = None
    # Round trip through transformers so the file has every field its class expects.
    return AutoConfig.for_model(**config).to_dict()


def dtype_name(hf: dict) -> str:
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
