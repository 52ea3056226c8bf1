"""Scaled RoPE against transformers' own code: for YaRN and Llama 3 configs, the frequencies and
attention factor we derive from config.json (convert/hf_config.py -> model/rope.py) equal those
transformers computes from the same file (``ROPE_INIT_FUNCTIONS``), including an omitted or
top-level ``original_max_position_embeddings``, a null ``factor``, ``truncate``, ``mscale`` pairs
and an explicit ``attention_factor``; the GPTModel we build carries them."""

import copy
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_solopo.convert.hf_config import model_config_from_hf
from megatron_solopo.model import rope
from megatron_solopo.model.build import build_model
from megatron_solopo.model.config import build_transformer_config
from megatron_solopo.parallel.distributed import (DistributedEnv, destroy_distributed,
                                                  initialize_distributed)
from megatron_solopo.parallel.layout import ParallelConfig
from tests.harness import free_port

BASE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 4096,
        "rope_theta": 1e6}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}

CASES = {
    "qwen2.5": dict(rope_scaling={"type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 4096}),
    "original_below_max": dict(rope_scaling=YARN),
    "original_omitted": dict(rope_scaling={"type": "yarn", "factor": 8.0}),
    "original_top_level": dict(rope_scaling=YARN, original_max_position_embeddings=16),
    "factor_null": dict(rope_scaling=dict(YARN, factor=None)),
    "no_truncate_betas": dict(rope_scaling=dict(YARN, truncate=False, beta_fast=8, beta_slow=2)),
    "mscale_pair": dict(rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.8)),
    "mscale_all_dim_zero": dict(rope_scaling=dict(YARN, mscale=0.7, mscale_all_dim=0)),
    "attention_factor": dict(rope_scaling=dict(YARN, attention_factor=1.25)),
    "head_dim": dict(head_dim=32, rope_scaling=dict(YARN, factor=2.0)),
    "theta_in_parameters": dict(rope_parameters=dict(YARN, rope_theta=5e5)),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 512}),
}


def transformers_rope(hf: dict) -> tuple[torch.Tensor, float]:
    config = transformers.AutoConfig.for_model(**copy.deepcopy(hf))  # it edits nested dicts
    return ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")


def ours(hf: dict) -> tuple[torch.Tensor, float]:
    model = model_config_from_hf(copy.deepcopy(hf))
    default = 1.0 / (model.rotary_base ** (torch.arange(0, model.kv_channels, 2,
                                                        dtype=torch.float32) / model.kv_channels))
    inv_freq = rope.scaled_inv_freq(default, model.rope_scaling, model.kv_channels,
                                    model.rotary_base, model.max_position_embeddings)
    scale = rope.softmax_scale(model.rope_scaling, model.kv_channels,
                               model.max_position_embeddings)
    attention_factor = 1.0 if scale is None else math.sqrt(scale * math.sqrt(model.kv_channels))
    return inv_freq, attention_factor


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_and_attention_factor_equal_transformers(name):
    hf = dict(BASE, **CASES[name])
    theirs_freq, theirs_factor = transformers_rope(hf)
    ours_freq, ours_factor = ours(hf)
    assert ours_freq.dtype == theirs_freq.dtype == torch.float32
    if name == "llama3":  # same formula written differently: equal to the last bit or two
        torch.testing.assert_close(ours_freq, theirs_freq, rtol=1e-6, atol=0)
    else:
        assert torch.equal(ours_freq, theirs_freq), (ours_freq - theirs_freq).abs().max()
    assert math.isclose(ours_factor, theirs_factor, rel_tol=1e-12), (ours_factor, theirs_factor)


def test_the_cases_reach_different_branches():
    """Rows that should differ do (so each exercises its branch), and a null factor is derived
    as max_position_embeddings / original_max_position_embeddings (4096 / 1024 = 4)."""
    results = {name: transformers_rope(dict(BASE, **CASES[name])) for name in CASES}
    lengths = ("qwen2.5", "original_below_max", "original_omitted", "original_top_level",
               "no_truncate_betas")
    assert len({tuple(results[name][0].tolist()) for name in lengths}) == len(lengths)
    assert torch.equal(results["factor_null"][0], results["original_below_max"][0])
    factors = ("original_below_max", "mscale_pair", "mscale_all_dim_zero", "attention_factor")
    assert len({round(results[name][1], 9) for name in factors}) == 3  # all_dim 0: the default
    assert results["mscale_all_dim_zero"][1] == results["original_below_max"][1]


@pytest.fixture(scope="module")
def single_process_megatron():
    initialize_distributed(ParallelConfig(), DistributedEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    yield
    destroy_distributed()


def test_built_model_carries_yarn_frequencies_and_softmax_scale(single_process_megatron):
    hf = dict(BASE, **CASES["mscale_pair"])
    model = model_config_from_hf(hf)
    config = build_transformer_config(model, ParallelConfig())
    (gpt,) = build_model(model, config)
    theirs_freq, theirs_factor = transformers_rope(hf)
    assert torch.equal(gpt.rotary_pos_emb.inv_freq.cpu(), theirs_freq)
    assert math.isclose(config.softmax_scale, theirs_factor ** 2 / math.sqrt(model.kv_channels),
                        rel_tol=1e-12)
    attention = gpt.decoder.layers[0].self_attention.core_attention
    assert attention.softmax_scale == config.softmax_scale


def test_yarn_needs_its_softmax_scale(single_process_megatron):
    """A TransformerConfig made without build_transformer_config would drop YaRN's attention
    factor silently; build_model refuses it."""
    import dataclasses

    model = model_config_from_hf(dict(BASE, **CASES["qwen2.5"]))
    config = dataclasses.replace(build_transformer_config(model, ParallelConfig()),
                                 softmax_scale=None)
    with pytest.raises(ValueError, match="YaRN, whose attention factor lives in"):
        build_model(model, config)
