"""Weight layouts: Hugging Face tensor names <-> our canonical keys (model/state.py).

Canonical per-layer keys have the layer as a leading axis; we address one layer at a time.

| canonical key (per layer)                               | Hugging Face (layer i)                        |
|---------------------------------------------------------|-----------------------------------------------|
| decoder.layers.self_attention.linear_qkv.layer_norm_weight | model.layers.i.input_layernorm.weight      |
| decoder.layers.self_attention.linear_qkv.weight / .bias | q_proj, k_proj, v_proj fused per KV group     |
| decoder.layers.self_attention.linear_proj.weight        | self_attn.o_proj.weight                       |
| decoder.layers.mlp.linear_fc1.layer_norm_weight         | post_attention_layernorm.weight               |
| decoder.layers.mlp.linear_fc1.weight                    | [mlp.gate_proj; mlp.up_proj]                  |
| decoder.layers.mlp.linear_fc2.weight                    | mlp.down_proj.weight                          |

Fused QKV (Megatron's grouped order): for each KV group g, the group's query heads, then its key
head, then its value head::

    [q(g0,h0) .. q(g0,h{n-1}) k(g0) v(g0) | q(g1,h0) .. k(g1) v(g1) | ...]   (each head_dim rows)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

LAYER_PREFIX = "decoder.layers."
GLOBAL_KEYS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
LAYER_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}
LAYER_LINEARS = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """q ``[heads*d, ...]``, k/v ``[groups*d, ...]`` -> Megatron's grouped ``[(heads+2*groups)*d, ...]``."""
    head_dim = k.shape[0] // num_groups
    rest = tuple(q.shape[1:])
    q = q.reshape(num_groups, num_heads // num_groups, head_dim, *rest)
    k = k.reshape(num_groups, 1, head_dim, *rest)
    v = v.reshape(num_groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    per_group = num_heads // num_groups + 2
    head_dim = qkv.shape[0] // (num_groups * per_group)
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_groups, per_group, head_dim, *rest)
    q = grouped[:, :-2].reshape(-1, *rest)
    k = grouped[:, -2].reshape(-1, *rest)
    v = grouped[:, -1].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


class SafetensorsReader:
    """Lazy access to the tensors of a (sharded or not) safetensors checkpoint."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
            weight_map = None
        else:
            raise ValueError(f"--hf-dir {directory}: no model.safetensors or "
                             f"model.safetensors.index.json (only safetensors checkpoints are read)")
        self.handles = {name: safe_open(str(directory / name), framework="pt") for name in files}
        self.location = {}
        for name, handle in self.handles.items():
            for key in handle.keys():
                self.location[key] = name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.location))
            if missing:
                raise ValueError(f"{index}: tensors listed but not found: {missing[:5]}")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def get(self, name: str) -> Tensor:
        if name not in self.location:
            raise ValueError(f"tensor {name!r} is missing from the Hugging Face checkpoint")
        return self.handles[self.location[name]].get_tensor(name)


def canonical_from_hf(key: str, layer: Optional[int], reader: SafetensorsReader, model) -> Tensor:
    """The canonical tensor ``key`` (of ``layer`` for per-layer keys) built from HF tensors."""
    if layer is None:
        if key == "output_layer.weight" and "lm_head.weight" not in reader:
            return reader.get("model.embed_tokens.weight")  # tied in the source
        return reader.get(GLOBAL_KEYS[key])
    base = f"model.layers.{layer}."
    suffix = key[len(LAYER_PREFIX):]
    if suffix in LAYER_NORMS:
        return reader.get(base + LAYER_NORMS[suffix])
    if suffix in LAYER_LINEARS:
        return reader.get(base + LAYER_LINEARS[suffix])
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = (reader.get(f"{base}self_attn.{name}_proj.{kind}") for name in "qkv")
        return fuse_qkv(q, k, v, model.num_attention_heads, model.num_query_groups)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([reader.get(base + "mlp.gate_proj.weight"),
                          reader.get(base + "mlp.up_proj.weight")])
    raise ValueError(f"no Hugging Face source for weight {key!r}")


def hf_from_canonical(key: str, layer: Optional[int], tensor: Tensor, model) -> Iterator[tuple[str, Tensor]]:
    """HF (name, tensor) pairs for one canonical tensor (the layer's slice for per-layer keys)."""
    if layer is None:
        yield GLOBAL_KEYS[key], tensor
        return
    base = f"model.layers.{layer}."
    suffix = key[len(LAYER_PREFIX):]
    if suffix in LAYER_NORMS:
        yield base + LAYER_NORMS[suffix], tensor
    elif suffix in LAYER_LINEARS:
        yield base + LAYER_LINEARS[suffix], tensor
    elif suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        for name, part in zip("qkv", split_qkv(tensor, model.num_attention_heads, model.num_query_groups)):
            yield f"{base}self_attn.{name}_proj.{kind}", part
    elif suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2)
        yield base + "mlp.gate_proj.weight", gate.contiguous()
        yield base + "mlp.up_proj.weight", up.contiguous()
    else:
        raise ValueError(f"no Hugging Face name for weight {key!r}")
