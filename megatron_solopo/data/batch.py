"""The packed micro-batch: whole preference groups concatenated in THD layout.

This is the contract between the data pipeline (which builds it), ``parallel/`` (which shards it
over context-parallel ranks) and ``training/`` (which feeds it to the model and turns per-token
log-probs into one value per (group, role)).

Shape legend: ``T`` padded token count of the pack, ``S`` number of sequences, ``G`` number of
preference groups. Every sequence is padded at its *tail* to a multiple of ``pad_multiple``
(``2 * CP``, times ``TP`` with sequence parallelism), so ``cu_seqlens`` holds the padded
boundaries and ``cu_seqlens[-1] == T``. Pad tokens sit after the real tokens of their own
sequence; under causal attention no real token sees them, and both masks exclude them.

Labels are shifted *within* each sequence before any context-parallel split:
``labels[t] = tokens[t + 1]`` when ``t + 1`` is a real token of the same sequence, else 0.
``loss_mask[t]`` is 1 when ``labels[t]`` is a response token, so the masked sum of per-token
log-probs is ``logp(y | x)``. ``target_mask[t]`` is 1 when ``labels[t]`` is any real token
(context or response): LongPO's NLL over the whole long sequence uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor



@dataclasses.dataclass
class PackedMicroBatch:
    tokens: Tensor  # [T] int64 input ids
    labels: Tensor  # [T] int64 next-token targets (0 where there is none)
    loss_mask: Tensor  # [T] float32, 1 where labels[t] is a response token
    target_mask: Tensor  # [T] float32, 1 where labels[t] is a real (context or response) token
    position_ids: Tensor  # [T] int64, restarting at 0 for every sequence
    cu_seqlens: Tensor  # [S + 1] int32 padded sequence boundaries; cu_seqlens[-1] == T
    seq_lengths: Tensor  # [S] int32 unpadded sequence lengths
    roles: Tensor  # [S] int64 Role.index of each sequence
    group_index: Tensor  # [S] int64 group of each sequence, 0..G-1 within this micro-batch
    sample_indices: Tensor  # [G] int64 index of each group's record in the dataset
    sample_ids: list[str]  # [G] record ids (the JSONL "id" field)
    max_seqlen: int  # longest padded sequence (never T itself unless S == 1; see docs/context_parallel.md)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.roles.numel())

    @property
    def num_groups(self) -> int:
        return int(self.sample_indices.numel())

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        """A copy with every tensor moved to ``device`` (metadata tensors included)."""
        moved = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        return PackedMicroBatch(**moved)

    def padded_to(self, num_tokens: int) -> "PackedMicroBatch":
        """The same micro-batch with its last sequence padded further so that ``T == num_tokens``
        (fixed pipeline shapes; see training/step.py). Padding is masked out like any other."""
        extra = num_tokens - self.num_tokens
        if extra < 0:
            raise ValueError(f"micro-batch has {self.num_tokens} tokens, more than {num_tokens}")
        if extra == 0:
            return self

        def pad(tensor: Tensor, value) -> Tensor:
            return torch.cat([tensor, tensor.new_full((extra,), value)])

        last_start = int(self.cu_seqlens[-2])
        positions = torch.arange(self.num_tokens - last_start, num_tokens - last_start,
                                 dtype=self.position_ids.dtype)
        cu_seqlens = self.cu_seqlens.clone()
        cu_seqlens[-1] = num_tokens
        return dataclasses.replace(
            self,
            tokens=pad(self.tokens, 0),
            labels=pad(self.labels, 0),
            loss_mask=pad(self.loss_mask, 0),
            target_mask=pad(self.target_mask, 0),
            position_ids=torch.cat([self.position_ids, positions]),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(self.max_seqlen, num_tokens - last_start),
        )

    def validate(self, pad_multiple: Optional[int] = None) -> None:
        """Check the invariants above; raises AssertionError (these are our own invariants)."""
        num_tokens = self.tokens.numel()
        for name in ("labels", "loss_mask", "target_mask", "position_ids"):
            assert getattr(self, name).shape == (num_tokens,), f"{name} has shape {getattr(self, name).shape}"
        assert self.cu_seqlens.dtype == torch.int32 and self.seq_lengths.dtype == torch.int32
        assert int(self.cu_seqlens[0]) == 0 and int(self.cu_seqlens[-1]) == num_tokens
        padded = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        assert bool((padded >= self.seq_lengths).all()), "a padded length is below its real length"
        assert self.max_seqlen == int(padded.max())
        if pad_multiple is not None:
            assert bool((padded % pad_multiple == 0).all()), f"sequence not padded to {pad_multiple}"
        assert self.roles.shape == self.group_index.shape == self.seq_lengths.shape
        assert len(self.sample_ids) == self.sample_indices.numel()
        assert int(self.group_index.max()) < self.num_groups
