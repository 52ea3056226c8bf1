"""config.json <-> ModelConfig: the mapping per family, both RoPE spellings, refusals by name, and
the way back (config.json from a ModelConfig, with or without the original)."""

import dataclasses
import importlib

import pytest
import transformers

from megatron_solopo.convert.hf_config import (detect_family, hf_config_from_model,
                                               model_config_from_hf, rope_settings)
from megatron_solopo.model.config import ModelConfig

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
         "hidden_act": "silu", "torch_dtype": "bfloat16"}


def test_llama_fields_map_to_megatron_names():
    model = model_config_from_hf(LLAMA)
    assert (model.family, model.num_layers, model.hidden_size, model.ffn_hidden_size) == \
        ("llama", 3, 64, 160)
    assert (model.num_attention_heads, model.num_query_groups, model.kv_channels) == (8, 2, 8)
    assert (model.vocab_size, model.max_position_embeddings) == (1000, 2048)
    assert model.rotary_base == 500000.0 and model.rope_scaling is None
    assert model.norm_epsilon == 1e-5 and not model.add_qkv_bias
    assert model.untie_embeddings_and_output_weights is False


def test_qwen2_has_qkv_bias_and_mistral_head_dim_is_kept():
    qwen = dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                use_sliding_window=False, sliding_window=4096)
    assert model_config_from_hf(qwen).add_qkv_bias
    mistral = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=None, head_dim=32)
    model = model_config_from_hf(mistral)
    assert model.family == "mistral" and model.kv_channels == 32 and not model.add_qkv_bias


def test_missing_fields_take_the_transformers_class_defaults():
    sparse = {key: LLAMA[key] for key in ("architectures", "hidden_size", "intermediate_size",
                                          "num_hidden_layers", "num_attention_heads", "vocab_size")}
    model = model_config_from_hf(sparse)
    defaults = transformers.LlamaConfig()
    assert model.norm_epsilon == defaults.rms_norm_eps
    assert model.max_position_embeddings == defaults.max_position_embeddings
    assert model.num_query_groups == 8 and model.rotary_base == 10000.0


def test_family_from_model_type_when_no_architectures():
    assert detect_family({"model_type": "mistral"}) == "mistral"


@pytest.mark.parametrize("spelling", [
    {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}},
])
def test_both_rope_spellings(spelling):
    assert rope_settings(spelling, "llama") == (5e5, {"type": "linear", "factor": 4.0})


def test_llama3_rope_scaling_keeps_its_parameters():
    hf = dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
    assert model_config_from_hf(hf).rope_scaling == {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("changes,message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     "architectures=['GPT2LMHeadModel'] is not supported"),
    (dict(architectures=None, model_type="gemma"), "model_type='gemma' is not supported"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
     "rope_scaling.rope_type='dynamic' is not supported; supported: default, linear, llama3, yarn"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "extrapolation": 2}),
     "rope_scaling={'extrapolation': 2} is not supported; YaRN keys we model"),
    (dict(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 512}),
     "rope_scaling of type 'yarn' has no 'factor'"),
    (dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=True),
     "attention_bias=True is not supported"),
    (dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=True,
          sliding_window=512, max_window_layers=1), "use_sliding_window=True is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_parameters.rope_type='dynamic' is not supported"),
    (dict(rope_scaling={"type": "longrope", "factor": 4.0}), "rope_type='longrope'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(mlp_bias=True), "mlp_bias=True is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(torch_dtype="float8_e4m3fn"), "dtype='float8_e4m3fn' is not supported"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=1024),
     "sliding_window=1024 is not supported; sliding-window attention is not modelled"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
          sliding_window=512, max_window_layers=1), "use_sliding_window=True is not supported"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"],
          sliding_window=256), "layer_types=['full_attention', 'sliding_attention']"),
    (dict(num_key_value_heads=3), "num_attention_heads=8 is not divisible"),
    (dict(model_type="gpt2"), "model_type='gpt2' is not supported; architectures says "
                              "LlamaForCausalLM, a llama model; the two disagree"),
])
def test_unmodelled_features_are_refused_by_name(changes, message):
    hf = {key: value for key, value in dict(LLAMA, **changes).items() if value is not None}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        model_config_from_hf(hf, "m/config.json")


@pytest.mark.parametrize("allowed", [
    dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=2048),
    dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
         sliding_window=512, max_window_layers=3),  # no layer actually slides
    dict(attention_bias=False, mlp_bias=False, rope_scaling={"rope_type": "default"}),
])
def test_windows_that_cover_everything_and_false_flags_are_accepted(allowed):
    model_config_from_hf(dict(LLAMA, **allowed))


@pytest.mark.parametrize("hf", [
    LLAMA,
    dict(LLAMA, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}),
    dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral", head_dim=16,
         sliding_window=None, rope_scaling={"type": "linear", "factor": 2.0}),
    dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32,
         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
    dict(LLAMA, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": None,
                                 "original_max_position_embeddings": 512, "beta_fast": 16,
                                 "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False,
                                 "attention_factor": 1.2}),
])
@pytest.mark.parametrize("with_original", [True, False])
def test_config_json_written_back_describes_the_same_model(hf, with_original):
    model = model_config_from_hf(hf)
    written = hf_config_from_model(model, hf if with_original else None, "bfloat16")
    assert model_config_from_hf(written) == model
    assert written["dtype"] == "bfloat16"
    loaded = transformers.AutoConfig.for_model(**written)  # transformers accepts it as is
    assert type(loaded).__name__ == {"llama": "LlamaConfig", "qwen2": "Qwen2Config",
                                     "qwen3": "Qwen3Config", "mistral": "MistralConfig"}[model.family]


def test_config_json_follows_fields_changed_in_training():
    original = dict(LLAMA)
    model = dataclasses.replace(model_config_from_hf(original), rotary_base=1e7,
                                max_position_embeddings=131072)
    written = hf_config_from_model(model, original, "bfloat16")
    assert written["rope_parameters"]["rope_theta"] == 1e7
    assert written["max_position_embeddings"] == 131072
    assert written["bos_token_id"] == transformers.LlamaConfig().bos_token_id


@pytest.mark.parametrize("model,message", [
    (ModelConfig(family="llama", add_qkv_bias=True, vocab_size=10), "no Hugging Face equivalent"),
    (ModelConfig(family="qwen2", add_qkv_bias=False, vocab_size=10), "needs add_qkv_bias=True"),
    (ModelConfig(family="qwen3", vocab_size=10), "qwen3.* with qk_layernorm=False"),
    (ModelConfig(family="llama", qk_layernorm=True, vocab_size=10), "Qwen3, and only Qwen3"),
])
def test_models_hugging_face_cannot_express_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        hf_config_from_model(model, None, "float32")


QWEN3 = dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32,
             tie_word_embeddings=True)


def test_qwen3_normalizes_queries_and_keys_without_biases():
    model = model_config_from_hf(QWEN3)
    assert model.family == "qwen3" and model.qk_layernorm and not model.add_qkv_bias
    assert model.kv_channels == 32 and model.untie_embeddings_and_output_weights is False
    # Qwen3Config's head_dim default is 128 whatever hidden / heads is; an omitted one means 128.
    omitted = {key: value for key, value in QWEN3.items() if key != "head_dim"}
    assert model_config_from_hf(omitted).kv_channels == transformers.Qwen3Config().head_dim == 128


def test_yarn_as_qwen2_5_ships_it():
    hf = dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
              max_position_embeddings=32768,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert model_config_from_hf(hf).rope_scaling == {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("extra,original", [
    ({}, 2048),  # absent: max_position_embeddings (transformers' standardization)
    ({"original_max_position_embeddings": 256}, 256),  # top level (Phi-3 style) wins
])
def test_yarn_original_length_when_the_rope_parameters_omit_it(extra, original):
    hf = dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0}, **extra)
    assert model_config_from_hf(hf).rope_scaling["original_max_position_embeddings"] == original


@pytest.mark.parametrize("feature,config,message", [
    ("qwen3", QWEN3, r"needs transformers >= 4.51 \(installed: 4.50.0\)"),
    ("yarn", dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"rope_type='yarn' is not supported; it needs transformers >= 4.56"),
])
def test_features_newer_than_the_installed_transformers_are_refused(monkeypatch, feature, config,
                                                                     message):
    # The module as imported now: saving a model replaces transformers' entry in sys.modules.
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.50.0")
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(config)
