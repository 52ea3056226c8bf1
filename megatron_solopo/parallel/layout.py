"""The parallel layout (TP x CP x PP x DP) and the one place that checks it.

Field names are Megatron-Core's (``ModelParallelConfig``), so ``--context-parallel-size 8`` in an
sbatch script means what a Megatron user expects. :func:`validate_parallel_layout` runs before any
process group or collective exists and reports every factor when something does not divide.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor parallel size (TP): each weight matrix split over this many GPUs, within a node."""

    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size (PP): the layers are split into this many stages."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage for the interleaved schedule (VPP); None = 1F1B."""

    context_parallel_size: int = 1
    """Context parallel size (CP): each long sequence is split over this many GPUs (2*CP chunks,
    load-balanced for causal attention)."""

    sequence_parallel: bool = False
    """Shard layer-norm/dropout activations along the sequence over the TP group (needs TP > 1)."""

    cp_comm_type: Literal["p2p", "all_gather", "a2a", "a2a+p2p"] = "p2p"
    """Transformer Engine context-parallel communication (ignored by the CPU reference path,
    which always all-gathers K/V)."""

    distributed_timeout_minutes: int = 30
    """Timeout of collectives before a hung job fails."""

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def describe(self, world_size: int) -> str:
        vpp = self.virtual_pipeline_model_parallel_size
        return (f"TP={self.tensor_model_parallel_size} CP={self.context_parallel_size} "
                f"PP={self.pipeline_model_parallel_size}"
                + (f" (VPP={vpp})" if vpp else "")
                + f" DP={self.data_parallel_size(world_size)}"
                + (" SP" if self.sequence_parallel else "")
                + f" world={world_size}")


def validate_parallel_layout(
    parallel: ParallelConfig,
    world_size: int,
    *,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
) -> int:
    """Check that the layout fits the world and the model; returns the data-parallel size.

    Raises ValueError listing every factor. Called before ``init_process_group`` and from
    ``--dry-run``, so a misconfigured 1,024-GPU job fails in seconds, not at the first collective.
    """
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    factors = (f"world size={world_size}, tensor_model_parallel_size(TP)={tp}, "
               f"context_parallel_size(CP)={cp}, pipeline_model_parallel_size(PP)={pp}, "
               f"virtual_pipeline_model_parallel_size(VPP)={vpp}, "
               f"sequence_parallel={parallel.sequence_parallel}, num_layers={num_layers}, "
               f"num_attention_heads={num_attention_heads}, num_query_groups={num_query_groups}")
    problems = []
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if vpp is not None and vpp < 2:
        problems.append(f"virtual_pipeline_model_parallel_size must be >= 2 (the interleaved "
                        f"schedule) or unset (plain 1F1B), got {vpp}")
    if not problems:
        model_parallel = tp * cp * pp
        if world_size % model_parallel != 0:
            problems.append(
                f"world size {world_size} is not divisible by TP*CP*PP = {tp}*{cp}*{pp} = "
                f"{model_parallel}; the data-parallel size DP = world/(TP*CP*PP) must be a "
                f"whole number")
        if num_attention_heads % tp != 0:
            problems.append(f"num_attention_heads={num_attention_heads} is not divisible by TP={tp}")
        if num_query_groups % tp != 0 and tp % num_query_groups != 0:
            problems.append(
                f"num_query_groups={num_query_groups} (KV heads) and TP={tp}: one must divide "
                f"the other")
        if num_attention_heads % num_query_groups != 0:
            problems.append(f"num_attention_heads={num_attention_heads} is not divisible by "
                            f"num_query_groups={num_query_groups}")
        stages = pp * (vpp or 1)
        if num_layers % stages != 0:
            problems.append(
                f"num_layers={num_layers} is not divisible by PP*VPP = {pp}*{vpp or 1} = {stages} "
                f"(every virtual pipeline stage needs the same number of layers)")
        if vpp is not None and vpp > 1 and pp < 2:
            problems.append("the interleaved schedule (VPP > 1) needs PP >= 2")
        if parallel.sequence_parallel and tp == 1:
            problems.append("sequence_parallel needs TP > 1 (it shards activations over the TP group)")
    if problems:
        raise ValueError("invalid parallel layout:\n  - " + "\n  - ".join(problems)
                         + f"\n  factors: {factors}")
    return world_size // (tp * cp * pp)
