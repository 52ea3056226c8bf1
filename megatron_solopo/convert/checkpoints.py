"""Former home of both conversion directions; kept so existing imports keep working.
New code imports from ``megatron_solopo.convert`` (hf_to_megatron.py, megatron_to_hf.py)."""

from megatron_solopo.convert.hf_to_megatron import hf_to_megatron
from megatron_solopo.convert.megatron_to_hf import megatron_to_hf

__all__ = ["hf_to_megatron", "megatron_to_hf"]
