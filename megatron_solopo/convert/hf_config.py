"""Hugging Face ``config.json`` <-> our ModelConfig (Llama, Qwen2, Qwen3, Mistral).

Anything we do not model is refused by name rather than silently converted into a different
model: other architectures, RoPE types other than default/linear/llama3/yarn, partial rotary
embeddings, sliding-window attention, biases other than Qwen2's Q/K/V bias, activations other
than SiLU, dtypes other than fp32/bf16/fp16. Both spellings of RoPE settings are read:
``rope_parameters`` (transformers >= 5) and ``rope_theta`` + ``rope_scaling`` (older files).
"""

from __future__ import annotations

import functools
from typing import NoReturn, Optional

from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.rope import ROPE_SCALING_KEYS, scaling_type

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral"}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}
CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "mistral": "MistralConfig"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16")
# Oldest transformers release that has a feature with the meaning we model (docs/conversion.md):
# Qwen3 arrived in 4.51; YaRN honours both factor and original_max_position_embeddings from 4.56
# (4.45-4.50 ignored original_max_position_embeddings, 4.51-4.55 replaced factor by
# max_position_embeddings / original_max_position_embeddings).
MIN_TRANSFORMERS = {"qwen3": "4.51", "yarn": "4.56"}


def refuse(source: str, field: str, value, supported: str) -> NoReturn:
    raise ValueError(f"{source}: {field}={value!r} is not supported; {supported}")


def require_transformers(feature: str, source: str, field: str, value) -> None:
    """Refuse ``feature`` (a MIN_TRANSFORMERS key) when the installed transformers predates it."""
    import transformers
    from packaging.version import Version

    minimum = MIN_TRANSFORMERS[feature]
    if Version(transformers.__version__) < Version(minimum):
        refuse(source, field, value,
               f"it needs transformers >= {minimum} (installed: {transformers.__version__}); "
               f"pip install 'transformers>={minimum}'")


@functools.lru_cache(maxsize=None)
def family_defaults(family: str) -> dict:
    """transformers' defaults for the family's config fields (a config.json may omit them)."""
    import transformers

    return getattr(transformers, CONFIG_CLASSES[family])().to_dict()


def _get(hf: dict, family: str, name: str):
    value = hf.get(name)
    return family_defaults(family).get(name) if value is None else value


def detect_family(hf: dict, source: str = "config.json") -> str:
    """``llama``, ``qwen2`` or ``mistral`` from ``architectures`` (else ``model_type``)."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            family = ARCHITECTURES[architecture]
            if model_type is not None and model_type != family:
                refuse(source, "model_type", model_type,
                       f"architectures says {architecture}, a {family} model; the two disagree")
            return family
    if architectures:
        refuse(source, "architectures", architectures,
               "supported: " + ", ".join(ARCHITECTURES))
    if model_type not in FAMILY_ARCHITECTURE:
        refuse(source, "model_type", model_type, "supported: " + ", ".join(FAMILY_ARCHITECTURE))
    return model_type


def _original_max_positions(hf: dict, parameters: dict, max_positions: int) -> int:
    """transformers (>= 5) reads a top-level ``original_max_position_embeddings`` first (Phi-3
    style), then the RoPE parameters' own, else ``max_position_embeddings``."""
    value = hf.get("original_max_position_embeddings")
    if value is None:
        value = parameters.get("original_max_position_embeddings")
    return int(max_positions if value is None else value)


def rope_settings(hf: dict, family: str, source: str = "config.json") -> tuple[float, Optional[dict]]:
    """(theta, scaling in ModelConfig's form) from either spelling of the RoPE settings."""
    parameters = dict(hf.get("rope_parameters") or {})
    if parameters and all(isinstance(value, dict) for value in parameters.values()):
        refuse(source, "rope_parameters", parameters,
               "per-attention-type RoPE parameters are not modelled (one set for all layers)")
    legacy = dict(hf.get("rope_scaling") or {})
    if legacy and not parameters.get("rope_type"):
        parameters.update(legacy)
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    theta = parameters.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        theta = (family_defaults(family).get("rope_parameters") or {}).get("rope_theta", 10000.0)
    partial = parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        refuse(source, "partial_rotary_factor", partial,
               "only full rotary embeddings (partial_rotary_factor 1.0) are modelled")
    kind = parameters.get("rope_type", parameters.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        refuse(source, f"{field}.rope_type", kind, "supported: " + ", ".join(ROPE_TYPES))
    if kind == "default":
        return float(theta), None
    max_positions = int(_get(hf, family, "max_position_embeddings"))
    if kind == "yarn":
        return float(theta), _yarn_settings(hf, parameters, field, source, max_positions)
    if parameters.get("factor") is None:
        raise ValueError(f"{source}: {field} of type {kind!r} has no 'factor'")
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(parameters["factor"])}
    return float(theta), {
        "type": "llama3", "factor": float(parameters["factor"]),
        "low_freq_factor": float(parameters.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(parameters.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": _original_max_positions(hf, parameters, max_positions),
    }


def _yarn_settings(hf: dict, parameters: dict, field: str, source: str, max_positions: int) -> dict:
    """YaRN in ModelConfig's form: the keys the config gives (transformers' meaning, including a
    null ``factor``), with ``original_max_position_embeddings`` resolved as transformers does."""
    require_transformers("yarn", source, f"{field}.rope_type", "yarn")
    known = set(ROPE_SCALING_KEYS["yarn"]) | {"type", "rope_type", "rope_theta",
                                              "partial_rotary_factor"}
    unknown = sorted(set(parameters) - known)
    if unknown:
        refuse(source, field, {key: parameters[key] for key in unknown},
               "YaRN keys we model: " + ", ".join(ROPE_SCALING_KEYS["yarn"]))
    if "factor" not in parameters:
        raise ValueError(f"{source}: {field} of type 'yarn' has no 'factor' (null derives it from "
                         f"max_position_embeddings / original_max_position_embeddings)")
    scaling = {"type": "yarn"}
    scaling.update({key: parameters[key] for key in ROPE_SCALING_KEYS["yarn"] if key in parameters})
    scaling["original_max_position_embeddings"] = _original_max_positions(hf, parameters,
                                                                          max_positions)
    return scaling


def _check_attention_window(hf: dict, family: str, source: str, max_positions: int) -> None:
    """Sliding-window attention is not modelled; a window that covers every position is."""
    window = hf.get("sliding_window")
    covers_all = window is None or int(window) >= max_positions
    if family == "mistral" and not covers_all:
        refuse(source, "sliding_window", window,
               f"sliding-window attention is not modelled; it must be null or >= "
               f"max_position_embeddings ({max_positions})")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and not covers_all:
        num_layers = int(hf["num_hidden_layers"])
        if int(_get(hf, family, "max_window_layers") or 0) < num_layers:
            refuse(source, "use_sliding_window", True,
                   f"sliding-window attention (sliding_window={window}) is not modelled; only "
                   f"use_sliding_window=false")
    layer_types = hf.get("layer_types") or []
    if not covers_all and any(kind != "full_attention" for kind in layer_types):
        refuse(source, "layer_types", sorted(set(layer_types)),
               "only full_attention layers are modelled")


def dtype_name(hf: dict) -> str:
    """The checkpoint dtype a config declares (``dtype``, or ``torch_dtype`` before v5)."""
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Hugging Face config, or ValueError naming what we do not model."""
    family = detect_family(hf, source)
    if family == "qwen3":
        require_transformers("qwen3", source, "architectures", [FAMILY_ARCHITECTURE[family]])
    activation = _get(hf, family, "hidden_act")
    if activation != "silu":
        refuse(source, "hidden_act", activation, "only silu (SwiGLU MLP)")
    if hf.get("mlp_bias"):
        refuse(source, "mlp_bias", hf["mlp_bias"], "MLP projections have no bias")
    if hf.get("attention_bias") and family != "qwen2":
        refuse(source, "attention_bias", hf["attention_bias"],
               "attention biases only as Qwen2's Q/K/V bias (this flag also biases o_proj)")
    if dtype_name(hf) not in DTYPES:
        refuse(source, "dtype", dtype_name(hf), "supported: " + ", ".join(DTYPES))
    max_positions = int(_get(hf, family, "max_position_embeddings"))
    _check_attention_window(hf, family, source, max_positions)
    theta, scaling = rope_settings(hf, family, source)
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is None and family == "qwen3":
        head_dim = family_defaults(family).get("head_dim")  # Qwen3Config: 128, not hidden / heads
    try:
        return ModelConfig(
            family=family,
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=int(head_dim or int(hf["hidden_size"]) // heads),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=max_positions,
            rotary_base=theta,
            rope_scaling=scaling,
            norm_epsilon=float(_get(hf, family, "rms_norm_eps")),
            # Qwen2's q/k/v projections always carry a bias (no config flag).
            add_qkv_bias=family == "qwen2",
            qk_layernorm=family == "qwen3",
            untie_embeddings_and_output_weights=not _get(hf, family, "tie_word_embeddings"),
        )
    except KeyError as missing:
        raise ValueError(f"{source}: required field {missing.args[0]!r} is missing") from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def hf_config_from_model(model: ModelConfig, original: Optional[dict], dtype: str) -> dict:
    """config.json for ``model``: the original Hugging Face config (when the model came from one)
    with every architectural field rewritten from ``model``, else a fresh one for its family."""
    from transformers import AutoConfig

    if model.family == "qwen2" and not model.add_qkv_bias:
        raise ValueError("model.family='qwen2' needs add_qkv_bias=True (Hugging Face Qwen2 always "
                         "has Q/K/V biases)")
    if model.family != "qwen2" and model.add_qkv_bias:
        raise ValueError(f"model.family={model.family!r} with add_qkv_bias=True has no Hugging "
                         f"Face equivalent (only qwen2 has Q/K/V biases alone)")
    if model.qk_layernorm != (model.family == "qwen3"):
        raise ValueError(f"model.family={model.family!r} with qk_layernorm={model.qk_layernorm} has "
                         f"no Hugging Face equivalent (Qwen3, and only Qwen3, normalizes queries "
                         f"and keys)")
    if model.family == "qwen3":
        require_transformers("qwen3", "model", "family", model.family)
    if scaling_type(model.rope_scaling) == "yarn":
        require_transformers("yarn", "model", "rope_scaling.type", "yarn")
    config = dict(original or {})
    for stale in ("rope_scaling", "rope_theta", "torch_dtype", "layer_types", "_name_or_path",
                  "transformers_version"):
        config.pop(stale, None)
    config.update({
        "architectures": [FAMILY_ARCHITECTURE[model.family]],
        "model_type": model.family,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "hidden_act": "silu",
        "dtype": dtype,
    })
    if "head_dim" in family_defaults(model.family) or "head_dim" in config or \
            model.kv_channels * model.num_attention_heads != model.hidden_size:
        config["head_dim"] = model.kv_channels
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.rope_scaling:
        scaling = dict(model.rope_scaling)
        kind = scaling.pop("type", None) or scaling.pop("rope_type")
        rope.update(scaling, rope_type=kind)
    if "type" in (config.get("rope_parameters") or {}):
        rope["type"] = rope["rope_type"]  # the legacy alias transformers keeps from rope_scaling
    config["rope_parameters"] = rope
    # Sliding windows are not modelled: the converted model attends over every position.
    if model.family == "mistral":
        config["sliding_window"] = None
    if model.family in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    # Through transformers, so the file has every field its config class expects.
    return AutoConfig.for_model(**config).to_dict()
