"""Process-group set-up: torchrun or Slurm environment, NCCL on GPU, gloo on CPU.

One process per GPU. Under ``torchrun`` the rank comes from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
under ``srun`` (one task per GPU, no torchrun) from ``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``, with the first host of ``SLURM_JOB_NODELIST`` as the rendezvous address.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Mapping, Optional

import torch

from megatron_solopo.parallel import cpu_compat
from megatron_solopo.parallel.layout import ParallelConfig, validate_parallel_layout

DEFAULT_MASTER_PORT = 29500


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``"gpu[012-015,020],cpu1"`` -> ``"gpu012"``,
    ``"gpu[012-015]-ib"`` -> ``"gpu012-ib"``."""
    nodelist = nodelist.strip()
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\]([^,\[]*))?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3) or ""
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def _int_env(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    if name not in environ and default is not None:
        return default
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _checked(env: DistributedEnv, names: tuple[str, str, str]) -> DistributedEnv:
    """Refuse impossible values here, before a rendezvous that would wait for ranks that never
    come (``distributed_timeout_minutes``). ``names``: the variables rank/world/port came from."""
    rank_name, world_name, port_name = names
    if env.world_size < 1:
        raise ValueError(f"{world_name}={env.world_size}: the world size must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"{rank_name}={env.rank} is not a rank of a world of {world_name}="
                         f"{env.world_size} (0 .. {env.world_size - 1})")
    if not 0 < env.master_port < 65536:
        raise ValueError(f"{port_name}={env.master_port} is not a TCP port (1 .. 65535)")
    return env


def detect_distributed_env(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """Rank and rendezvous from torchrun's variables, else Slurm's, else a single process."""
    environ = os.environ if environ is None else environ
    torchrun = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    if len(torchrun) == 1:
        missing = ({"RANK", "WORLD_SIZE"} - set(torchrun)).pop()
        raise ValueError(f"{torchrun[0]} is set but {missing} is not: launch with torchrun (which "
                         f"sets both), or unset {torchrun[0]}")
    if torchrun:
        return _checked(DistributedEnv(
            rank=_int_env(environ, "RANK"),
            world_size=_int_env(environ, "WORLD_SIZE"),
            local_rank=_int_env(environ, "LOCAL_RANK", 0),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
            launcher="torchrun",
        ), ("RANK", "WORLD_SIZE", "MASTER_PORT"))
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        if "MASTER_ADDR" in environ:
            master_addr = environ["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in environ:
            master_addr = first_slurm_host(environ["SLURM_JOB_NODELIST"])
        else:
            raise ValueError("Slurm launch without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find "
                             "the rendezvous host")
        # Derive a job-specific port so two jobs sharing a node do not collide.
        default_port = DEFAULT_MASTER_PORT + _int_env(environ, "SLURM_JOB_ID", 0) % 10000
        return _checked(DistributedEnv(
            rank=_int_env(environ, "SLURM_PROCID"),
            world_size=_int_env(environ, "SLURM_NTASKS"),
            local_rank=_int_env(environ, "SLURM_LOCALID", 0),
            master_addr=master_addr,
            master_port=_int_env(environ, "MASTER_PORT", default_port),
            launcher="slurm",
        ), ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"))
    return _checked(DistributedEnv(0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"),
                                   _int_env(environ, "MASTER_PORT", DEFAULT_MASTER_PORT), "single"),
                    ("rank", "world size", "MASTER_PORT"))


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> DistributedEnv:
    """A world of one on this host (tools that need Megatron's process groups, e.g. conversion)."""
    return DistributedEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def initialize_distributed(
    parallel: ParallelConfig,
    env: Optional[DistributedEnv] = None,
    *,
    model=None,
    seed: int = 1234,
) -> DistributedEnv:
    """Create the default process group (if needed) and Megatron's model-parallel groups.

    With ``model`` (a ModelConfig) the layout is validated against it and the world size first,
    before any process group exists. On a machine without CUDA this installs the CPU shims and
    uses gloo; with CUDA it binds the local GPU and uses NCCL. Also seeds Megatron's RNGs.
    """
    from megatron.core import parallel_state

    env = detect_distributed_env() if env is None else env
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() \
        else env.world_size
    if model is not None:
        validate_parallel_layout(parallel, world_size, num_layers=model.num_layers,
                                 num_attention_heads=model.num_attention_heads,
                                 num_query_groups=model.num_query_groups)
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.install_cpu_shims()
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    set_seed(seed)
    return env


def set_seed(seed: int) -> None:
    """Seed python/torch RNGs and Megatron's tracker (different per PP stage, as Megatron does)."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
