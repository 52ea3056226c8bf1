"""CPU compatibility for megatron-core 0.19 (active only when CUDA is absent).

megatron-core is written for CUDA. On a CPU-only machine (our CI, laptops, the reference path of
every parallel layout with gloo) it fails in two ways:

1. At import: ``megatron/core/transformer/moe/ops/paged_stash.py`` does an unguarded
   ``import triton`` and is reached from ``megatron/core/__init__.py`` (through
   ``pipeline_parallel/schedules.py``). :func:`install_triton_stub` registers a stub for that
   one module when triton is not installed. We never fake ``triton`` itself: ~30 other modules
   guard ``import triton`` and would take GPU-only paths if it seemed present. The stubbed
   kernels are used only by MoE paged stashing, which we do not use.
2. At run time: ~100 hard-coded CUDA calls (``torch.cuda.current_device()``, ``device="cuda"``
   literals, CUDA RNG state, streams, ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks).
   :func:`install_cpu_shims` redirects each to the CPU. Every shim says which megatron-core
   code needs it (file:line in megatron-core 0.19.2).

Both are no-ops when CUDA is available, so the same code and tests run unchanged on a GPU.
Each patch below names the megatron-core code that needs it; docs/cpu.md has the user-facing
summary.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types

_PAGED_STASH_MODULE = "megatron.core.transformer.moe.ops.paged_stash"

# Names of the shims applied in this process, for logs and tests.
applied_shims: list[str] = []


def install_triton_stub() -> None:
    """Make ``import megatron.core`` work without triton (see the module docstring, item 1)."""
    if _PAGED_STASH_MODULE in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(_PAGED_STASH_MODULE)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError(
            "megatron-core's paged-stash triton kernels are not available: triton is not installed"
        )

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    sys.modules[_PAGED_STASH_MODULE] = stub


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Run-time shims. Each function patches one family of CUDA assumptions.
# --------------------------------------------------------------------------------------------


def _shim_current_device(torch) -> None:
    # `device=torch.cuda.current_device()` at rotary_pos_embedding.py:162, gpt_model.py:452,
    # tensor_parallel/layers.py:305/647/708, tensor_parallel/mappings.py:95/145/152/185,
    # tensor_parallel/utils.py:70/91, dot_product_attention.py:123, attention.py:530, ...
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.device_count = lambda: 0


def _shim_rng(torch) -> None:
    # tensor_parallel/random.py:118/171/303-306/490: the model-parallel RNG tracker saves and
    # restores CUDA RNG states. Mapping them onto the CPU generator keeps tracker.fork() a real
    # switch of RNG streams (weight init, dropout in TP regions).
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed calls torch.cuda.manual_seed_all itself: that one must not recurse.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    # tracker.fork() warns when the CPU RNG moved inside a fork; on CPU the "CUDA" generator *is*
    # the CPU one, so that warning would fire on every fork (random.py:333).
    import logging

    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)


def _shim_synchronize(torch) -> None:
    # parallel_state.py:216/1035/1506, p2p_communication.py:263, filesystem_async.py:248 and the
    # optimizer call torch.cuda.synchronize(); on CPU every op is already synchronous.
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _shim_default_causal_mask(torch) -> None:
    # transformer/utils.py:39 get_default_causal_mask() builds its mask with device="cuda"; it
    # is reached when a local-spec model gets attention_mask=None (fused_softmax.py:327).
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=8)
    def get_default_causal_mask(sq: int):
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _shim_torch_norm_sequence_parallel(torch) -> None:
    allow_sequence_parallel_torch_norm()


def allow_sequence_parallel_torch_norm() -> None:
    """Not CPU-only: the reference layer spec applies it on GPUs too (model/build.py).

    transformer/torch_norm.py:50: WrappedTorchNorm (the local spec's RMSNorm) asserts
    `not config.sequence_parallel`. The math is the same under SP provided the norm weights are
    marked `.sequence_parallel`, so finalize_model_grads.py:452 all-reduces their grads over TP,
    as apex's FusedLayerNorm does (fused_layer_norm.py:119-120)."""
    from megatron.core.transformer import torch_norm

    norm_cls = torch_norm.WrappedTorchNorm
    if getattr(norm_cls, "_solopo_sp_patched", False):
        return
    original_new = norm_cls.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    norm_cls.__new__ = __new__
    norm_cls._solopo_sp_patched = True


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: factory calls with ``device="cuda"``
    create CPU tensors; every other attribute is the real torch."""

    _FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like",
                            "ones_like", "empty_like", "randn", "rand", "randint"})

    def __init__(self, torch):
        super().__init__("torch")
        self._torch = torch

    def __getattr__(self, name):
        attr = getattr(self._torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


# Modules that pass device="cuda" literals to torch factories (megatron-core 0.19.2).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # :749, :1121, :2292 total_num_tokens
    "megatron.core.optimizer.optimizer",  # :315/690/698/702/1249 found_inf, _scale
    "megatron.core.optimizer.clip_grads",  # :96/108/112/180/231 grad norm, zero count
    "megatron.core.optimizer.grad_scaler",  # :20/111/114/117 loss scaler
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",  # :1332 local_multi_tensor_l2_norm (no apex/TE)
    "megatron.core.distributed.param_and_grad_buffer",  # :1145 warm-up tensor
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # :204
    "megatron.core.dist_checkpointing.exchange_utils",  # :103/109/329
)


def _shim_cuda_literals(torch) -> None:
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "torch", None), _CpuTorch):
            module.torch = _CpuTorch(torch)


class _NoOpStream:
    """Stands in for torch.cuda.Stream and torch.cuda.Event on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, *args, **kwargs):
        return 0.0


def _shim_streams(torch) -> None:
    # param_and_grad_buffer.py:632 torch.cuda.current_stream() on every grad sync, :686-691/814
    # torch.cuda.stream(...) with overlap_grad_reduce, distributed_data_parallel.py:297
    # torch.cuda.Stream(), transformer_layer.py:1578 torch.cuda.Event.
    current = _NoOpStream()
    torch.cuda.current_stream = lambda *args, **kwargs: current
    torch.cuda.default_stream = lambda *args, **kwargs: current
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _shim_tensor_type_strings(torch) -> None:
    # The optimizers check CUDA type *strings*: clip_grads.py:174
    # `param.grad.type() == 'torch.cuda.FloatTensor'`, distrib_optimizer.py:401/466/758,
    # optimizer.py:1009/1028. The argument-less Tensor.type() of a CPU tensor reports
    # 'torch.cuda.*'; casting forms (x.type(dtype)) are untouched.
    if getattr(torch.Tensor.type, "_solopo_cpu_shim", False):
        return
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch."):]
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    tensor_type._solopo_cpu_shim = True
    torch.Tensor.type = tensor_type


def _shim_tensor_cuda(torch) -> None:
    # language_module.py:307 moves the tied embedding to the GPU with `weight.data.cuda()`
    # before all-reducing it between the first and last pipeline stage (PP > 1, tied weights).
    # Without CUDA the tensor stays where it is.
    if getattr(torch.Tensor.cuda, "_solopo_cpu_shim", False):
        return

    def cuda(self, *args, **kwargs):
        return self

    cuda._solopo_cpu_shim = True
    torch.Tensor.cuda = cuda


_SHIMS = (
    ("current_device", _shim_current_device),
    ("rng", _shim_rng),
    ("synchronize", _shim_synchronize),
    ("default_causal_mask", _shim_default_causal_mask),
    ("torch_norm_sequence_parallel", _shim_torch_norm_sequence_parallel),
    ("cuda_literals", _shim_cuda_literals),
    ("streams", _shim_streams),
    ("tensor_type_strings", _shim_tensor_type_strings),
    ("tensor_cuda", _shim_tensor_cuda),
)


def install_cpu_shims() -> list[str]:
    """Install every run-time shim when CUDA is absent; returns the names applied (idempotent).

    Call once per process before building Megatron modules; :func:`megatron_solopo.parallel.
    distributed.initialize_distributed` does it for you.
    """
    import torch

    if torch.cuda.is_available():
        return []
    install_triton_stub()
    for name, shim in _SHIMS:
        if name not in applied_shims:
            shim(torch)
            applied_shims.append(name)
    return list(applied_shims)
