"""megatron-solopo: short-to-long preference optimization for long-context LLMs on Megatron-Core."""

__version__ = "0.1.0"
