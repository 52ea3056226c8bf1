"""Weight layouts: Hugging Face tensor names <-> our canonical keys (model/state.py). Pure tensor
code: no files, no process groups.

A canonical tensor is one layer's slice of a canonical key (the layer is the leading axis of the
global tensor), or a whole non-layer tensor. ``L``: layers, ``H``: hidden size, ``F``: FFN size,
``d``: head dim, ``nq``/``ng``: query heads / KV groups, ``V``/``Vp``: vocab / padded vocab.

| canonical key (per layer i: ``[L, ...]``, we address ``[i]``) | Hugging Face (layer i)              |
|---------------------------------------------------------------|-------------------------------------|
| embedding.word_embeddings.weight ``[Vp, H]``                  | model.embed_tokens.weight ``[V, H]``|
| decoder.layers.self_attention.linear_qkv.layer_norm_weight    | model.layers.i.input_layernorm.weight |
| decoder.layers.self_attention.linear_qkv.weight ``[(nq+2ng)d, H]`` | self_attn.{q,k,v}_proj, grouped |
| decoder.layers.self_attention.linear_qkv.bias (Qwen2)         | self_attn.{q,k,v}_proj.bias, grouped |
| decoder.layers.self_attention.q_layernorm.weight ``[d]`` (Qwen3) | self_attn.q_norm.weight          |
| decoder.layers.self_attention.k_layernorm.weight ``[d]`` (Qwen3) | self_attn.k_norm.weight          |
| decoder.layers.self_attention.linear_proj.weight ``[H, nq*d]`` | self_attn.o_proj.weight            |
| decoder.layers.mlp.linear_fc1.layer_norm_weight               | post_attention_layernorm.weight     |
| decoder.layers.mlp.linear_fc1.weight ``[2F, H]``              | [mlp.gate_proj; mlp.up_proj]        |
| decoder.layers.mlp.linear_fc2.weight ``[H, F]``               | mlp.down_proj.weight                |
| decoder.final_layernorm.weight                                | model.norm.weight                   |
| output_layer.weight ``[Vp, H]`` (untied only)                 | lm_head.weight ``[V, H]``           |

Fused QKV is Megatron's grouped order (megatron/core/transformer/attention.py,
``get_query_key_value_tensors`` views it as ``[ng, (nq/ng + 2) * d]`` and splits q, k, v): for each
KV group g, the group's query heads, then its key head, then its value head::

    [q(g0,h0) .. q(g0,h{n-1}) k(g0) v(g0) | q(g1,h0) .. k(g1) v(g1) | ...]   (each d rows)

Hugging Face repeats KV head g for query heads g*n .. g*n+n-1 (``repeat_kv``), the same grouping.
SwiGLU's fc1 is ``[gate; up]`` (megatron/core/transformer/mlp.py: ``glu`` chunks it in two and
applies the activation to the first half; ``apply_swiglu_sharded_factory`` stores the halves as
the two halves of the global tensor, whatever the TP).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
VOCAB_KEYS = (EMBEDDING, OUTPUT_LAYER)

LAYER_PREFIX = "decoder.layers."
QKV_WEIGHT = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
Q_NORM = "decoder.layers.self_attention.q_layernorm.weight"
K_NORM = "decoder.layers.self_attention.k_layernorm.weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"

# Canonical keys fed by exactly one Hugging Face tensor (``{i}``: the layer).
ONE_TO_ONE = {
    EMBEDDING: "model.embed_tokens.weight",
    OUTPUT_LAYER: "lm_head.weight",
    FINAL_NORM: "model.norm.weight",
    INPUT_NORM: "model.layers.{i}.input_layernorm.weight",
    PROJ: "model.layers.{i}.self_attn.o_proj.weight",
    Q_NORM: "model.layers.{i}.self_attn.q_norm.weight",
    K_NORM: "model.layers.{i}.self_attn.k_norm.weight",
    MLP_NORM: "model.layers.{i}.post_attention_layernorm.weight",
    FC2: "model.layers.{i}.mlp.down_proj.weight",
}
QKV_SOURCES = {QKV_WEIGHT: "model.layers.{i}.self_attn.{p}_proj.weight",
               QKV_BIAS: "model.layers.{i}.self_attn.{p}_proj.bias"}
FC1_SOURCES = ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")

# Linear layers whose (empty) ``_extra_state`` Megatron checkpoints as a per-layer ShardedObject.
EXTRA_STATE_KEYS = tuple(f"decoder.layers.{name}._extra_state" for name in (
    "self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2"))

# Hugging Face tensors that carry no weights of their own (recomputed or tied).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class CanonicalTensor:
    """One layer's slice of a canonical key (``layer`` is None for non-layer keys)."""

    key: str
    layer: Optional[int]
    shape: tuple  # without the layer axis

    @property
    def name(self) -> str:
        return self.key if self.layer is None else f"{self.key}[{self.layer}]"


def canonical_tensors(model, padded_vocab_size: int) -> list[CanonicalTensor]:
    """Every canonical tensor of ``model`` (a ModelConfig) in Hugging Face file order:
    embedding, layer by layer, final norm, output layer (untied only)."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    per_layer = [(INPUT_NORM, (h,)), (QKV_WEIGHT, (q + 2 * kv, h))]
    if model.add_qkv_bias:
        per_layer.append((QKV_BIAS, (q + 2 * kv,)))
    if model.qk_layernorm:
        per_layer += [(Q_NORM, (d,)), (K_NORM, (d,))]
    per_layer += [(PROJ, (h, q)), (MLP_NORM, (h,)), (FC1, (2 * f, h)), (FC2, (h, f))]
    entries = [CanonicalTensor(EMBEDDING, None, (padded_vocab_size, h))]
    for layer in range(model.num_layers):
        entries += [CanonicalTensor(key, layer, shape) for key, shape in per_layer]
    entries.append(CanonicalTensor(FINAL_NORM, None, (h,)))
    if model.untie_embeddings_and_output_weights:
        entries.append(CanonicalTensor(OUTPUT_LAYER, None, (padded_vocab_size, h)))
    return entries


def hf_sources(entry: CanonicalTensor) -> list[str]:
    """Names of the Hugging Face tensors that make up ``entry``, in fusing order."""
    i = entry.layer
    if entry.key in ONE_TO_ONE:
        return [ONE_TO_ONE[entry.key].format(i=i)]
    if entry.key in QKV_SOURCES:
        return [QKV_SOURCES[entry.key].format(i=i, p=p) for p in "qkv"]
    if entry.key == FC1:
        return [name.format(i=i) for name in FC1_SOURCES]
    raise AssertionError(f"no Hugging Face source for {entry.name}")


def hf_shapes(model) -> dict[str, tuple]:
    """Shape of every Hugging Face tensor ``model`` has (unpadded vocabulary; no ``lm_head``
    when tied, as ``save_pretrained`` writes it)."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h), "model.norm.weight": (h,)}
    if model.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    for i in range(model.num_layers):
        base = f"model.layers.{i}."
        shapes.update({
            base + "input_layernorm.weight": (h,),
            base + "post_attention_layernorm.weight": (h,),
            base + "self_attn.q_proj.weight": (q, h),
            base + "self_attn.k_proj.weight": (kv, h),
            base + "self_attn.v_proj.weight": (kv, h),
            base + "self_attn.o_proj.weight": (h, q),
            base + "mlp.gate_proj.weight": (f, h),
            base + "mlp.up_proj.weight": (f, h),
            base + "mlp.down_proj.weight": (h, f),
        })
        if model.add_qkv_bias:
            shapes.update({base + "self_attn.q_proj.bias": (q,), base + "self_attn.k_proj.bias": (kv,),
                           base + "self_attn.v_proj.bias": (kv,)})
        if model.qk_layernorm:
            shapes.update({base + "self_attn.q_norm.weight": (d,), base + "self_attn.k_norm.weight": (d,)})
    return shapes


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """q ``[nq*d, ...]``, k/v ``[ng*d, ...]`` -> Megatron's grouped ``[(nq + 2*ng)*d, ...]``."""
    head_dim = k.shape[0] // num_groups
    rest = tuple(q.shape[1:])
    q = q.reshape(num_groups, num_heads // num_groups, head_dim, *rest)
    k = k.reshape(num_groups, 1, head_dim, *rest)
    v = v.reshape(num_groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    per_group = num_heads // num_groups + 2
    head_dim = qkv.shape[0] // (num_groups * per_group)
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_groups, per_group, head_dim, *rest)
    q = grouped[:, :-2].reshape(-1, *rest)
    k = grouped[:, -2].reshape(-1, *rest)
    v = grouped[:, -1].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def resize_vocab_rows(tensor: Tensor, num_rows: int) -> Tensor:
    """Cut padding rows, or append zero rows (padded entries are masked out of the softmax and
    never used as inputs, so their values do not matter)."""
    if tensor.shape[0] >= num_rows:
        return tensor[:num_rows]
    padding = tensor.new_zeros((num_rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, padding])


def to_canonical_parts(entry: CanonicalTensor, sources: list[Tensor], model) -> list[Tensor]:
    """The canonical tensor from its Hugging Face tensors (``hf_sources`` order), as the parts
    that stack along dim 0 into it: ``[gate, up]`` for SwiGLU's fc1 (kept apart because
    Megatron checkpoints them as two halves anyway), one tensor otherwise."""
    if entry.key in VOCAB_KEYS:
        return [resize_vocab_rows(sources[0], entry.shape[0])]
    if entry.key in ONE_TO_ONE:
        return [sources[0]]
    if entry.key in QKV_SOURCES:
        return [fuse_qkv(*sources, model.num_attention_heads, model.num_query_groups)]
    if entry.key == FC1:
        return list(sources)
    raise AssertionError(f"no Hugging Face source for {entry.name}")


def to_canonical(entry: CanonicalTensor, sources: list[Tensor], model) -> Tensor:
    """The canonical tensor from its Hugging Face tensors (``hf_sources`` order)."""
    parts = to_canonical_parts(entry, sources, model)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def from_canonical(entry: CanonicalTensor, tensor: Tensor, model) -> list[tuple[str, Tensor]]:
    """Hugging Face (name, tensor) pairs for one canonical tensor; the vocabulary is unpadded."""
    names = hf_sources(entry)
    if entry.key in VOCAB_KEYS:
        return [(names[0], tensor[:model.vocab_size])]
    if entry.key in ONE_TO_ONE:
        return [(names[0], tensor)]
    if entry.key in QKV_SOURCES:
        parts = split_qkv(tensor, model.num_attention_heads, model.num_query_groups)
        return list(zip(names, parts, strict=True))
    if entry.key == FC1:
        gate, up = tensor.chunk(2)
        return [(names[0], gate.contiguous()), (names[1], up.contiguous())]
    raise AssertionError(f"no Hugging Face name for {entry.name}")
