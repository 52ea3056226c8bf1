"""Tiny random Hugging Face checkpoints, built locally with transformers' own classes (nothing is
downloaded): for tests, and to try the conversion tools end to end in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

# name -> (config class, model class, config fields over TINY)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)
TINY_VARIANTS = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_mha_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # head_dim 32 != hidden / heads = 16: exercises ModelConfig.kv_channels.
    "mistral_head_dim": ("MistralConfig", "MistralForCausalLM",
                         dict(sliding_window=None, head_dim=32, tie_word_embeddings=False)),
    # Qwen3: per-head q/k RMSNorm, no biases; tied with a decoupled head_dim as in the small sizes.
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM",
                   dict(tie_word_embeddings=True, head_dim=32)),
    "qwen3_untied": ("Qwen3Config", "Qwen3ForCausalLM",
                     dict(tie_word_embeddings=False, head_dim=16, num_key_value_heads=1)),
    # YaRN as Qwen2.5 ships it (legacy rope_scaling spelling, max_position_embeddings left at the
    # original length), and with every optional knob set (a short original length, so test
    # sequences reach beyond it).
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=False, max_position_embeddings=64, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
        "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0,
        "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False})),
}


def make_tiny_hf_checkpoint(directory: Union[str, Path], variant: str = "llama_gqa_untied", *,
                            dtype: torch.dtype = torch.float32, max_shard_size="200KB",
                            seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Save a random tiny ``variant`` (see ``TINY_VARIANTS``; ``overrides`` are config fields)
    with ``save_pretrained`` (sharded at ``max_shard_size``) and, with ``tokenizer``, a tiny BPE
    tokenizer of the same vocabulary. Norm weights and biases are random too, so a mapping
    mistake cannot hide behind ones and zeros."""
    import transformers

    if variant not in TINY_VARIANTS:
        raise ValueError(f"variant {variant!r}; valid: {', '.join(TINY_VARIANTS)}")
    config_name, model_name, extra = TINY_VARIANTS[variant]
    if not hasattr(transformers, model_name):
        raise ValueError(f"variant {variant!r} needs {model_name}, which transformers "
                         f"{transformers.__version__} does not have (Qwen3: >= 4.51)")
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model = model.to(dtype)
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer:
        from megatron_solopo.data.tiny_tokenizers import make_hf_tokenizer

        make_hf_tokenizer(str(directory), vocab_size=config.vocab_size)
    return directory
