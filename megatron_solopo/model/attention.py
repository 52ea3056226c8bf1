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

It loops over the sequences of a pack and uses ``scaled_dot_product_attention`` per sequence, so
memory is O(L_i * L_i / CP) per sequence, not O(T^2). It is a reference, not a fast path: long
runs on GPU use TE.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
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
            return self._packed(query, key, value, cu_seqlens)
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

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor) -> Tensor:
        """query [T/cp, heads, d], key/value [T/cp, kv_heads, d] -> [T/cp, heads * d]."""
        cu_seqlens = cu_seqlens.to("cpu", torch.long)
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
            if cp_size == 1:
                outputs.append(self._attend(q, k, v, None, causal=True))
                continue
            length = k.shape[0]
            chunk = length // (2 * cp_size)
            q_pos = torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                               torch.arange((2 * cp_size - 1 - cp_rank) * chunk,
                                            (2 * cp_size - cp_rank) * chunk)])
            allowed = torch.arange(length)[None, :] <= q_pos[:, None]  # [lq, lk], True = attend
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

