"""The Megatron side without a model: canonical tensors as dist_checkpointing ShardedTensors.

A converted checkpoint must be what a Megatron GPTModel of any layout asks for when it loads. We
write exactly what a TP=PP=1 GPTModel's ``sharded_state_dict()`` holds (after factories), without
building one: per-layer tensors carry the layer as a prepended axis (offset ``(0, i, L)``, as
``TransformerBlock`` adds it), SwiGLU's fc1 goes as its two halves (``apply_swiglu_sharded_factory``
with one TP rank), each linear layer has its empty ``_extra_state`` object, and the vocabulary
tensors may change row count on load. tests/unit/test_convert_weights.py checks this against a
real model's sharded state dict field by field. dist_checkpointing reshards on load, so the
checkpoint loads under any TP/PP/VPP/CP/DP layout.

Reading goes the other way, one canonical key at a time, with requests for whole (unsharded)
tensors of the checkpoint's own dtype, whatever layout it was saved under.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from megatron_solopo.convert.weights import EXTRA_STATE_KEYS, FC1, VOCAB_KEYS, CanonicalTensor

MAIN_REPLICA = (0, 0, 0)  # (pipeline-ish, TP rank, DP rank) of the only rank of a world of one


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A world-of-one gloo process group for dist_checkpointing (which needs one even in a single
    process), unless one exists; conversion itself is single-process."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ValueError("checkpoint conversion runs in a single process; start it with "
                             "python, not torchrun")
        yield
        return
    from megatron_solopo.parallel import cpu_compat
    from megatron_solopo.parallel.distributed import free_port

    if not torch.cuda.is_available():
        cpu_compat.install_cpu_shims()
    # gloo even on a GPU machine: every tensor here lives on the CPU.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _layer_offsets(entry: CanonicalTensor, num_layers: int) -> tuple:
    return () if entry.layer is None else ((0, entry.layer, num_layers),)


def sharded_tensors_for(entry: CanonicalTensor, parts: list[torch.Tensor], num_layers: int) -> list:
    """The ShardedTensors a TP=PP=1 GPTModel writes for ``entry``, whose tensor is ``parts``
    stacked along dim 0 (``[gate, up]`` for fc1, else one tensor)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if entry.key == FC1 and len(parts) == 1:
        parts = list(parts[0].chunk(2))
    rows = sum(part.shape[0] for part in parts)
    assert (rows,) + tuple(parts[0].shape[1:]) == tuple(entry.shape), (entry.name, entry.shape)
    offsets = _layer_offsets(entry, num_layers)
    prepend = len(offsets)
    if entry.key == FC1:
        # SwiGLU's factory: [gate; up] saved as the two halves of axis 0 (fragmentation 2).
        # Separate tensors, not views of one: dist_checkpointing clones views before writing.
        return [ShardedTensor.from_rank_offsets(entry.key, half, *offsets, (prepend, index, 2),
                                                replica_id=MAIN_REPLICA, prepend_axis_num=prepend)
                for index, half in enumerate(parts)]
    (tensor,) = parts
    return [ShardedTensor.from_rank_offsets(entry.key, tensor, *offsets, replica_id=MAIN_REPLICA,
                                            prepend_axis_num=prepend,
                                            allow_shape_mismatch=entry.key in VOCAB_KEYS)]


def extra_state_objects(num_layers: int) -> list:
    """The (empty) per-layer ``_extra_state`` objects of the linear layers, which a model
    requests on load."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return [ShardedObject(key, None, (num_layers,), (layer,), MAIN_REPLICA)
            for layer in range(num_layers) for key in EXTRA_STATE_KEYS]


class CanonicalChunk:
    """Stands in for a model chunk in training.checkpoint.save_checkpoint, which only asks a
    chunk for ``sharded_state_dict()``: the converter saves through the trainer's own
    (atomic, tracker-last) save path without building a model."""

    def __init__(self, tensors: dict[CanonicalTensor, list[torch.Tensor]], num_layers: int):
        self.tensors = tensors
        self.num_layers = num_layers

    def sharded_state_dict(self) -> dict:
        state: dict = {}
        for entry, parts in self.tensors.items():
            shards = sharded_tensors_for(entry, parts, self.num_layers)
            state[entry.name] = shards if len(shards) > 1 else shards[0]
        for obj in extra_state_objects(self.num_layers):
            state[f"{obj.key}[{obj.global_offset[0]}]"] = obj
        return state


def checkpoint_tensors(directory: Path) -> dict:
    """Global shape and dtype of every tensor of a checkpoint: ``{key: ShardedTensor}`` (no data)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(str(directory))


def load_whole(directory: Path, key: str, saved: dict) -> torch.Tensor:
    """One canonical key as a whole tensor (``[L, ...]`` for layer keys; vocabulary rows as
    saved) in the checkpoint's dtype, whatever layout wrote it; nothing else is read.

    Whole keys, not single layers: in a world of one, megatron's torch_dist loader places every
    fragment of a request's grid on this rank, so a request for one layer's slice is refused."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = saved[key]
    buffer = torch.empty(tuple(stored.global_shape), dtype=stored.dtype)
    request = {key: ShardedTensor.from_rank_offsets(key, buffer, replica_id=0)}
    return dist_checkpointing.load(request, str(directory))[key]


def check_checkpoint_matches(entries: list[CanonicalTensor], saved: dict, num_layers: int,
                             directory: Path) -> None:
    """ValueError unless the checkpoint holds every canonical key with the model's shape
    (vocabulary rows: whatever padding it was saved with)."""
    for entry in entries:
        if entry.key not in saved:
            raise ValueError(f"{directory}: weight {entry.key!r} is missing; the checkpoint does not "
                             f"match its run_config.yaml model section")
        shape = tuple(saved[entry.key].global_shape)
        expected = ((num_layers,) if entry.layer is not None else ()) + tuple(entry.shape)
        if entry.key in VOCAB_KEYS:
            expected = (shape[0],) + expected[1:]
        if shape != expected:
            raise ValueError(f"{directory}: weight {entry.key!r} has shape {shape}, the "
                             f"run_config.yaml model section implies {expected}")
