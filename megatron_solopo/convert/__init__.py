"""Checkpoint conversion between Hugging Face (Llama, Qwen2, Qwen3, Mistral) and our Megatron checkpoints.

Public API (tools/convert_checkpoint.py and tools/verify_conversion.py are thin CLIs over it;
docs/conversion.md explains the formats):

- :func:`hf_to_megatron` (``convert.hf_to_megatron``): HF safetensors dir -> release checkpoint
- :func:`megatron_to_hf` (``convert.megatron_to_hf``): any of our checkpoints -> HF dir
- :func:`verify_conversion` (``convert.verify``): per-token log-prob parity, HF vs ours
- ``convert.hf_config``: config.json <-> ModelConfig, refusal of what we do not model
- ``convert.weights``: tensor names and fused layouts (QKV, SwiGLU fc1), pure tensor code
"""

from megatron_solopo.convert.hf_to_megatron import hf_to_megatron
from megatron_solopo.convert.megatron_to_hf import megatron_to_hf
from megatron_solopo.convert.verify import verify_conversion

__all__ = ["hf_to_megatron", "megatron_to_hf", "verify_conversion"]
