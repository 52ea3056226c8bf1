"""Whole-model weights <-> this rank's shards, for any TP/PP/VPP layout, in memory.

The canonical "full" state dict uses Megatron's *sharded* keys and global shapes: the keys that
``dist_checkpointing`` writes (``decoder.layers.self_attention.linear_qkv.weight`` with the layer
as a leading axis, fused QKV in Megatron's grouped order, SwiGLU fc1 as ``[gate; up]``). They do
not depend on the layout or on the layer spec (TE and local specs map to the same keys). We
reuse each module's ``sharded_state_dict()`` metadata to slice or assemble, so no layout rule is
written twice. Used by the parity tests and by checkpoint conversion.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.distributed as dist


def _leaves(tree) -> Iterator:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def sharded_tensors(model_chunks) -> list:
    """This rank's ShardedTensors (factories such as SwiGLU's fc1 split applied), whose ``data``
    are views of the live parameters."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_solopo.model.build import unwrap_model

    result = []
    for chunk in model_chunks:
        state = unwrap_model(chunk).sharded_state_dict()
        apply_factories(state)
        result.extend(leaf for leaf in _leaves(state) if isinstance(leaf, ShardedTensor))
    return result


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def resize_vocab_rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Embedding/output weight with ``num_rows`` rows: padding rows are cut or added as zeros.
    Padded entries are masked out of the softmax (model/logprobs.py) and never appear as inputs,
    so their values do not matter; this is what lets a model move between TP sizes (the padded
    vocabulary is a multiple of 128 * TP)."""
    if tensor.shape[0] >= num_rows:
        return tensor[:num_rows]
    padding = tensor.new_zeros((num_rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, padding])


@torch.no_grad()
def load_full_state_dict(model_chunks, full: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy this rank's slices of ``full`` (canonical keys, global shapes) into the parameters.
    The vocabulary dimension may be padded differently (see :func:`resize_vocab_rows`)."""
    missing = []
    for sharded in sharded_tensors(model_chunks):
        if sharded.key not in full:
            missing.append(sharded.key)
            continue
        source = full[sharded.key]
        if sharded.key in VOCAB_KEYS and source.shape[0] != sharded.global_shape[0]:
            source = resize_vocab_rows(source, sharded.global_shape[0])
        if tuple(source.shape) != tuple(sharded.global_shape):
            raise ValueError(f"weight {sharded.key!r}: checkpoint shape {tuple(source.shape)} does "
                             f"not match the model's {tuple(sharded.global_shape)}")
        sharded.data.copy_(source[sharded.global_slice()])
    if strict and missing:
        raise ValueError(f"weights missing from the state dict: {sorted(set(missing))}")


@torch.no_grad()
def gather_full_state_dict(model_chunks, group=None, *,
                           local_only: bool = False) -> dict[str, torch.Tensor]:
    """Assemble the whole model from every rank's shards; every rank gets the result (CPU).

    Collective over ``group`` (default: the whole world), which must contain every shard once.
    ``local_only``: this rank holds the whole model (TP=PP=1); no communication.
    """
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    local = sharded_tensors(model_chunks)
    shapes = {t.key: (tuple(t.global_shape), t.data.dtype) for t in local}
    collective = not local_only and dist.is_initialized() and dist.get_world_size(group) > 1
    if collective:
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, shapes, group=group)
        for other in everyone:
            shapes.update(other)
    full = {}
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        tensor = torch.zeros(shape, dtype=dtype)
        for sharded in local:
            if sharded.key == key and (local_only or is_main_replica(sharded.replica_id)):
                tensor[sharded.global_slice()] = sharded.data.detach().cpu()
        if collective:
            # Each element is written by exactly one main replica, so a sum assembles the tensor.
            device = local[0].data.device if local else torch.device("cpu")
            reduced = tensor.to(device)
            dist.all_reduce(reduced, group=group)
            tensor = reduced.cpu()
        full[key] = tensor
    return full
