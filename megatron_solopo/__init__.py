"""megatron-solopo: short-to-long preference optimization for long-context LLMs on Megatron-Core."""

import os as _os

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


# Notices megatron-core and torch print on every run that say nothing about this run (APIs we do
# not call, or call as intended): dropped in every process that imports the package.
# MEGATRON_SOLOPO_SHOW_WARNINGS=1 shows them again.
_BENIGN_WARNINGS = (
    "full scope is deprecated",  # TransformerConfig's cuda-graph default, not ours
    "MimoModelConfig is experimental",  # imported by megatron-core, unused
    "torch.distributed is disabled, unavailable or uninitialized",  # single-process conversion
    "The argument order of load has been changed",  # megatron-core's dcp call, as intended
    "Please use DTensor instead and we are deprecating ShardedTensor",  # torch_dist format
)
_BENIGN_LOG_MESSAGES = {"megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED"}


def _quiet_benign_notices() -> None:
    import logging
    import os
    import warnings

    if os.environ.get("MEGATRON_SOLOPO_SHOW_WARNINGS", "") not in ("", "0"):
        return
    for message in _BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)

    class _Drop(logging.Filter):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

        def filter(self, record: logging.LogRecord) -> bool:
            return self.text not in record.getMessage()

    for name, text in _BENIGN_LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_Drop(text))


if _os.environ.get("MEGATRON_SOLOPO_SHOW_WARNINGS", "") in ("", "0"):
    _quiet_cpu_notices()
_quiet_benign_notices()

__version__ = "0.1.0"
