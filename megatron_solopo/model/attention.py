"""Reference core attention: packed sequences and context parallelism without Transformer Engine.

Megatron-Core's local ``DotProductAttention`` rejects both packed (THD) input and context
parallelism; only ``TEDotProductAttention`` has them. This module takes its place in the local
layer spec so that every parallel layout runs (and is tested) on CPU with gloo, and on a GPU
without TE:

- packed THD input: causal attention inside each sequence of ``cu_seqlens`` (block-diagonal);
- context parallelism: K and V are all-gathered over the CP group (backward reduce-scatters their
  gradients), put back in global order, and each local query attends to the keys at or before its
  global position (the load-balanced layout of ``parallel/context_parallel.py``);
- grouped-query attention.

- shared-prefix segments (data/batch.py): inside a segment ``[prefix | chosen | rejected]`` the
  rejected branch's queries do not see the chosen branch's keys (``branch_bounds``).

It loops over the sequences of a pack and uses ``scaled_dot_product_attention`` per sequence, so
memory is O(L_i * L_i / CP) per sequence, not O(T^2). It is a reference, not a fast path: long
runs on GPU use TE, or :class:`FlexCoreAttention` (``attention_backend: flex``), the same masks as
one FlexAttention call with a block-sparse mask, for GPUs without Transformer Engine.

:func:`enable_position_rope` makes a GPTModel's rotary embedding honour per-token positions
(shared-prefix segments continue the prefix's positions in the rejected branch), which
Megatron-Core's THD RoPE otherwise restarts at every ``cu_seqlens`` boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_solopo.parallel import context_parallel as cpar


class ReferenceCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1
        tp_size = self.tp_group.size()
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = max(1, config.num_query_groups // tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self._order_cache: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)

    def _global_order(self, cu_seqlens: Tensor) -> Tensor:
        # Every layer of a forward sees the same cu_seqlens: compute the permutation once.
        cached_cu, cached_order = self._order_cache
        if cached_cu is None or not torch.equal(cached_cu, cu_seqlens.cpu()):
            cached_cu = cu_seqlens.cpu()
            cached_order = cpar.gather_order(cached_cu, self.cp_size)
            self._order_cache = (cached_cu, cached_order)
        return cached_order

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type=None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("ReferenceCoreAttention does not support attention_bias")
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError("packed (THD) input takes its causal structure from cu_seqlens; "
                                 "pass attention_mask=None")
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            return self._packed(query, key, value, cu_seqlens,
                                getattr(packed_seq_params, "branch_bounds", None),
                                per_forward=packed_seq_params)
        # [s, b, heads, dim]: each batch row is one sequence (of length s * CP under CP).
        seq_len, batch = query.shape[0], query.shape[1]
        if attention_mask is not None and self.cp_size == 1 and batch > 0:
            return self._masked(query, key, value, attention_mask)
        to_thd = lambda t: t.transpose(0, 1).reshape(batch * seq_len, t.shape[2], t.shape[3])
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32) * (seq_len * self.cp_size)
        out = self._packed(to_thd(query), to_thd(key), to_thd(value), cu_seqlens)
        return out.view(batch, seq_len, -1).transpose(0, 1).contiguous()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """q [lq, heads, d], k/v [lk, kv_heads, d] -> [lq, heads * d]."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, l, d]
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            rng = contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=causal, scale=self.softmax_scale)
        return out.squeeze(0).transpose(0, 1).reshape(out.shape[2], -1)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor,
                branch_bounds: Optional[Tensor] = None, per_forward=None) -> Tensor:
        """query [T/cp, heads, d], key/value [T/cp, kv_heads, d] -> [T/cp, heads * d].
        ``branch_bounds`` [S, 2]: keys at [a, b) of segment i are hidden from its queries >= b."""
        cu_seqlens = cu_seqlens.to("cpu", torch.long)
        bounds = branch_bounds.tolist() if branch_bounds is not None else None
        cp_size = self.cp_size
        if cp_size > 1:
            order = self._global_order(cu_seqlens).to(key.device)
            key = cpar.all_gather_context_parallel(key, self.cp_group).index_select(0, order)
            value = cpar.all_gather_context_parallel(value, self.cp_group).index_select(0, order)
            cp_rank = self.cp_group.rank()
        local_cu = cpar.local_cu_seqlens(cu_seqlens, cp_size).tolist()
        global_cu = cu_seqlens.tolist()
        outputs = []
        for index in range(len(global_cu) - 1):
            q = query[local_cu[index]:local_cu[index + 1]]
            k = key[global_cu[index]:global_cu[index + 1]]
            v = value[global_cu[index]:global_cu[index + 1]]
            if q.shape[0] == 0:
                continue
            length = k.shape[0]
            branch = bounds is not None and bounds[index][0] < bounds[index][1]
            if cp_size == 1 and not branch:
                outputs.append(self._attend(q, k, v, None, causal=True))
                continue
            if cp_size == 1:
                # [prefix | chosen] is plain causal; the rejected branch attends to a key list
                # that is the prefix followed by itself, causal aligned bottom-right. The masks
                # stay [R, P + R] instead of [L, L].
                first, second = bounds[index]
                head = self._attend(q[:second], k[:second], v[:second], None, causal=True)
                rows = length - second
                keys = torch.cat([k[:first], k[second:]])
                values = torch.cat([v[:first], v[second:]])
                allowed = (torch.arange(first + rows)[None, :]
                           <= first + torch.arange(rows)[:, None])
                tail = self._attend(q[second:], keys, values, allowed.to(q.device), causal=False)
                outputs.append(torch.cat([head, tail]))
                continue
            if cp_size == 1:
                q_pos = torch.arange(length)
            else:
                chunk = length // (2 * cp_size)
                q_pos = torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                                   torch.arange((2 * cp_size - 1 - cp_rank) * chunk,
                                                (2 * cp_size - cp_rank) * chunk)])
            k_pos = torch.arange(length)[None, :]
            allowed = k_pos <= q_pos[:, None]  # [lq, lk], True = attend
            if branch:
                first, second = bounds[index]
                allowed &= ~((k_pos >= first) & (k_pos < second) & (q_pos[:, None] >= second))
            outputs.append(self._attend(q, k, v, allowed.to(q.device), causal=False))
        return torch.cat(outputs, dim=0)

    def _masked(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor) -> Tensor:
        """Unpacked [s, b, h, d] with an explicit Megatron mask (True = masked out)."""
        seq_len, batch = query.shape[0], query.shape[1]
        mask = attention_mask.expand(batch, 1, seq_len, seq_len)
        outputs = []
        for row in range(batch):
            allowed = ~mask[row, 0]
            outputs.append(self._attend(query[:, row], key[:, row], value[:, row], allowed, False))
        return torch.stack(outputs, dim=1)



# ---------------------------------------------------------------------------------------------
# FlexAttention: the same masks in one block-sparse kernel (GPU without Transformer Engine)
# ---------------------------------------------------------------------------------------------
_COMPILED_FLEX = None


def _flex_attention():
    """FlexAttention is fast only compiled (eager runs a dense reference); CPU has no backward
    and is used here for forward checks only, uncompiled."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def packed_block_mask(cu_seqlens: Tensor, branch_bounds: Optional[Tensor], cp_size: int,
                      cp_rank: int, device: torch.device):
    """The FlexAttention ``BlockMask`` of a pack: causal inside each segment, the chosen branch
    of a shared segment hidden from its rejected branch; queries are this CP rank's tokens (its
    load-balanced order), keys the whole pack in global order."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu = cu_seqlens.to("cpu", torch.long)
    bounds = None if branch_bounds is None else branch_bounds.to("cpu", torch.long)
    lengths = cu[1:] - cu[:-1]
    num_tokens = int(cu[-1])
    kv_segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    kv_offset = torch.arange(num_tokens) - cu[:-1][kv_segment]
    if bounds is None:
        bounds = torch.stack([lengths, lengths], dim=1)
    q_index = cpar.zigzag_indices(cu, cp_size, cp_rank) if cp_size > 1 else torch.arange(num_tokens)
    q_segment, q_offset = kv_segment[q_index], kv_offset[q_index]
    q_segment, q_offset, kv_segment, kv_offset, first, second = (
        t.to(device) for t in (q_segment, q_offset, kv_segment, kv_offset, bounds[:, 0], bounds[:, 1]))

    def mask_mod(batch, head, q_idx, kv_idx):
        segment = q_segment[q_idx]
        q_off, kv_off = q_offset[q_idx], kv_offset[kv_idx]
        hidden = (kv_off >= first[segment]) & (kv_off < second[segment]) & (q_off >= second[segment])
        return (segment == kv_segment[kv_idx]) & (kv_off <= q_off) & ~hidden

    mask = create_block_mask(mask_mod, None, None, q_index.numel(), num_tokens, device=device,
                             _compile=device.type == "cuda")
    return mask


class FlexCoreAttention(ReferenceCoreAttention):
    """``attention_backend: flex``: :class:`ReferenceCoreAttention`'s masks (packed sequences,
    shared-prefix segments, context parallelism through all-gathered K/V) as one FlexAttention
    call with a block-sparse mask, so work and memory follow the mask instead of looping over
    sequences. A fast path for GPUs without Transformer Engine, not a reference; on CPU it runs
    forward only (PyTorch has no CPU backward for FlexAttention)."""

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor,
                branch_bounds: Optional[Tensor] = None, per_forward=None) -> Tensor:
        if self.training and self.dropout_p > 0:
            raise ValueError("attention_backend 'flex' has no attention dropout; set "
                             "attention_dropout to 0 or use attention_backend 'reference'")
        if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
            raise ValueError("attention_backend 'flex' has no backward on the CPU (PyTorch's "
                             "FlexAttention runs forward only there); train on the CPU with "
                             "attention_backend 'reference'")
        cp_rank = 0
        if self.cp_size > 1:
            order = self._global_order(cu_seqlens.to("cpu", torch.long)).to(key.device)
            key = cpar.all_gather_context_parallel(key, self.cp_group).index_select(0, order)
            value = cpar.all_gather_context_parallel(value, self.cp_group).index_select(0, order)
            cp_rank = self.cp_group.rank()
        # Every layer of one forward sees the same pack: build the mask once, kept on the
        # forward's packed-sequence parameters (no host sync in the other layers).
        mask = getattr(per_forward, "flex_block_mask", None)
        if mask is None:
            mask = packed_block_mask(cu_seqlens, branch_bounds, self.cp_size, cp_rank, query.device)
            if per_forward is not None:
                per_forward.flex_block_mask = mask
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, h, t, d]
        out = _flex_attention()(q, k, v, block_mask=mask, scale=self.softmax_scale,
                                enable_gqa=self.num_heads != self.num_kv_heads)
        return out.squeeze(0).transpose(0, 1).reshape(query.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Transformer Engine (no context parallelism): separate query and key/value segments
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SharedPrefixTELayout:
    """A shared-prefix pack as THD query and key/value segments for one TE call: a shared
    segment ``[prefix | chosen | rejected]`` gives two query segments, ``[prefix | chosen]``
    (keys the same tokens) and ``[rejected]`` (keys: the prefix followed by the rejected branch,
    gathered into a new K/V buffer), both causal aligned bottom-right (TE's
    ``padding_causal_bottom_right``); an unshared segment is one of each."""

    kv_index: Tensor  # [T_kv] long: the key/value buffer, as token indices of the pack
    cu_seqlens_q: Tensor  # [n + 1] int32 over the pack's tokens (unchanged order)
    cu_seqlens_kv: Tensor  # [n + 1] int32 over the key/value buffer
    max_seqlen_q: int
    max_seqlen_kv: int


def te_shared_prefix_layout(cu_seqlens: Tensor, branch_bounds: Tensor,
                            device: torch.device) -> SharedPrefixTELayout:
    cu = cu_seqlens.to("cpu", torch.long)
    bounds = branch_bounds.to("cpu", torch.long)
    kv_pieces, q_bounds, kv_lengths = [], [0], []
    for (start, end), (first, second) in zip(zip(cu[:-1].tolist(), cu[1:].tolist()),
                                             bounds.tolist()):
        if first >= second:
            q_bounds.append(end)
            kv_pieces.append(torch.arange(start, end))
            kv_lengths.append(end - start)
            continue
        q_bounds += [start + second, end]
        kv_pieces += [torch.arange(start, start + second), torch.arange(start, start + first),
                      torch.arange(start + second, end)]
        kv_lengths += [second, first + end - start - second]
    q_lengths = [b - a for a, b in zip(q_bounds[:-1], q_bounds[1:])]
    layout = SharedPrefixTELayout(
        kv_index=torch.cat(kv_pieces).to(device),
        cu_seqlens_q=torch.tensor(q_bounds, dtype=torch.int32, device=device),
        cu_seqlens_kv=torch.tensor([0] + list(torch.tensor(kv_lengths).cumsum(0).tolist()),
                                   dtype=torch.int32, device=device),
        max_seqlen_q=max(q_lengths), max_seqlen_kv=max(kv_lengths))
    return layout


def shared_prefix_te_attention(base):
    """A subclass of Megatron's TE core attention class ``base`` that computes shared-prefix
    packs with :class:`SharedPrefixTELayout` (context parallelism off; TE's CP attention refuses
    bottom-right causal masks, so packing stays unshared there). Other packs go to ``base``
    unchanged."""

    class SharedPrefixTEDotProductAttention(base):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **kwargs):
            bounds = getattr(packed_seq_params, "branch_bounds", None)
            if bounds is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias=attention_bias,
                                       packed_seq_params=packed_seq_params, **kwargs)
            if attention_bias is not None or self.config.context_parallel_size > 1:
                raise ValueError("shared-prefix packs with Transformer Engine need context "
                                 "parallelism off and no attention bias; set "
                                 "data.shared_prefix: false")
            layout = getattr(packed_seq_params, "te_layout", None)
            if layout is None:  # once per forward, kept for the other layers
                layout = te_shared_prefix_layout(packed_seq_params.cu_seqlens_q_padded,
                                                 bounds, query.device)
                packed_seq_params.te_layout = layout
            key = key.index_select(0, layout.kv_index)
            value = value.index_select(0, layout.kv_index)
            # Megatron's wrapper has no name for this mask type: call TE's module directly.
            te_forward = next(cls for cls in type(self).__mro__
                              if cls.__module__.startswith("transformer_engine")).forward
            return te_forward(
                self, query, key, value, None, qkv_format="thd",
                attn_mask_type="padding_causal_bottom_right",
                cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_kv=layout.cu_seqlens_kv,
                cu_seqlens_q_padded=layout.cu_seqlens_q, cu_seqlens_kv_padded=layout.cu_seqlens_kv,
                max_seqlen_q=layout.max_seqlen_q, max_seqlen_kv=layout.max_seqlen_kv)

    SharedPrefixTEDotProductAttention.__name__ = f"SharedPrefix{base.__name__}"
    return SharedPrefixTEDotProductAttention


# ---------------------------------------------------------------------------------------------
# RoPE at per-token positions
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SharedPrefixSeqParams(PackedSeqParams):
    """Megatron's THD parameters plus what shared-prefix segments need: ``branch_bounds`` [S, 2]
    (the chosen branch of segment i, hidden from its rejected branch) and ``rope_positions`` [T]
    (every token's global position). Megatron passes the object to core attention unchanged."""

    branch_bounds: Optional[Tensor] = None
    rope_positions: Optional[Tensor] = None


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
def enable_position_rope(rotary, config) -> None:
    """Let a GPTModel's rotary embedding module take per-token positions from the packed
    sequence parameters (``rope_positions``, global ``[T]``, set for shared-prefix packs by
    model/logprobs.py::packed_seq_params).

    GPTModel asks the module for the table length (``get_rotary_seq_len``, which sees the packed
    parameters) and then for the table ``[max_seqlen, 1, 1, d]``, which Megatron's THD RoPE applies
    restarting at every segment. Given positions, the table becomes ``table[positions]``, one row
    per token of the pack: Megatron's unfused THD RoPE then indexes it by each token's global
    offset (its "packed freqs" mode, context parallelism included), so a rejected branch gets the
    positions that continue its prefix. Packs without positions are untouched. Patched on the
    instance (not wrapped) so the module's state-dict keys stay Megatron's."""
    original_length = rotary.get_rotary_seq_len
    original_forward = rotary.forward
    pending: dict = {}

    def get_rotary_seq_len(*args, **kwargs):
        params = kwargs.get("packed_seq_params", args[4] if len(args) > 4 else None)
        pending["positions"] = getattr(params, "rope_positions", None)
        return original_length(*args, **kwargs)

    def forward(*args, **kwargs):
        table = original_forward(*args, **kwargs)
        positions = pending.pop("positions", None)
        if positions is None:
            return table
        if config.apply_rope_fusion:
            raise ValueError("shared-prefix packing needs the unfused RoPE (apply_rope_fusion "
                             "False): the fused THD kernel restarts positions at every segment; "
                             "remove apply_rope_fusion from model.transformer_overrides or set "
                             "data.shared_prefix: false")
        if isinstance(table, tuple):  # YaRN returns (table, mscale)
            return (table[0].index_select(0, positions.to(table[0].device)), *table[1:])
        return table.index_select(0, positions.to(table.device))

    rotary.get_rotary_seq_len = get_rotary_seq_len
    rotary.forward = forward
