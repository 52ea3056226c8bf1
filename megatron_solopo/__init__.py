"""megatron-solopo: short-to-long preference optimization for long-context LLMs on Megatron-Core."""

from megatron_solopo.parallel.cpu_compat import install_triton_stub as _install_triton_stub

# megatron-core 0.19 cannot be imported without triton (one unguarded import, MoE only); the stub
# is registered only when triton is missing, so `import megatron.core` works after this package.
_install_triton_stub()

__version__ = "0.1.0"
