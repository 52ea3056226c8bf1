"""megatron-solopo: short-to-long preference optimization for long-context LLMs on Megatron-Core."""

from megatron_solopo.parallel.cpu_compat import install_triton_stub as _install_triton_stub

# megatron-core 0.19 cannot be imported without triton (one unguarded import, MoE only); the stub
# is registered only when triton is missing, so `import megatron.core` works after this package.
_install_triton_stub()


def _quiet_cpu_notices() -> None:
    """Without CUDA, megatron-core warns on import that TE/apex are missing and it falls back to
    local implementations: always true on CPU, so the notice is dropped there (kept on GPUs,
    where it means a slower fallback).

    ``device_count()`` asks NVML, not the CUDA runtime: importing this package must not
    initialize CUDA, or processes forked after the import (multiprocessing's fork/forkserver)
    could not use the GPU."""
    import warnings

    import torch

    if torch.cuda.device_count() == 0:
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")


_quiet_cpu_notices()

__version__ = "0.1.0"
