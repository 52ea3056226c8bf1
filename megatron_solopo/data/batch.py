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

**Shared-prefix packing** (``data.shared_prefix``; docs/data.md draws it). Two sequences of a
group that start with the same tokens (chosen and rejected on one context) may share one THD
*segment* ``[prefix | chosen branch | rejected branch | pad]``: the prefix is computed once, the
rejected branch attends to the prefix and to itself, never to the chosen branch, and its positions
continue from the end of the prefix. ``cu_seqlens`` then holds the boundaries of the S' <= S
physical segments (what attention, RoPE and context parallelism see), while ``roles``,
``group_index`` and ``seq_lengths`` still describe the S *logical* sequences, in the same order
as without sharing. Three fields map one onto the other (all None without sharing):

- ``cu_pieces`` [N + 1]: global boundaries of *pieces*, a refinement of ``cu_seqlens``: an unshared
  segment is one piece; a shared one is three (prefix, chosen branch, rejected branch + padding);
- ``piece_sequences`` [M, 2]: (piece, logical sequence) pairs; a sequence is the union of its
  pieces, so its sums are sums over them (a prefix belongs to both sequences);
- ``branch_bounds`` [S', 2]: ``(a, b)`` offsets inside each segment: keys at ``[a, b)`` (the chosen
  branch) are hidden from queries at ``>= b`` (the rejected branch); ``(L, L)`` when unshared.

The prefix ends one token before the sequences differ, so every position still has exactly one
target: the last common token is repeated at the start of both branches.
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
    # Shared-prefix packing only (see the module docstring); None: segments are sequences.
    cu_pieces: Optional[Tensor] = None  # [N + 1] int32 piece boundaries, refining cu_seqlens
    piece_sequences: Optional[Tensor] = None  # [M, 2] int64 (piece, logical sequence) pairs
    branch_bounds: Optional[Tensor] = None  # [S', 2] int32 chosen-branch offsets in each segment

    @property
    def shared(self) -> bool:
        """True when some segment holds a shared prefix (the piece fields are set)."""
        return self.cu_pieces is not None

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
        # Padding continues the last segment's positions (a shared segment's rejected branch
        # does not start at its offset).
        first = int(self.position_ids[-1]) + 1
        positions = torch.arange(first, first + extra, dtype=self.position_ids.dtype)
        cu_seqlens = self.cu_seqlens.clone()
        cu_seqlens[-1] = num_tokens
        shared = {}
        if self.shared:
            cu_pieces = self.cu_pieces.clone()
            cu_pieces[-1] = num_tokens
            shared["cu_pieces"] = cu_pieces
        return dataclasses.replace(
            self,
            tokens=pad(self.tokens, 0),
            labels=pad(self.labels, 0),
            loss_mask=pad(self.loss_mask, 0),
            target_mask=pad(self.target_mask, 0),
            position_ids=torch.cat([self.position_ids, positions]),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(self.max_seqlen, num_tokens - last_start),
            **shared,
        )

    def validate(self, pad_multiple: Optional[int] = None) -> None:
        """Check the invariants above; raises AssertionError (these are our own invariants)."""
        num_tokens = self.tokens.numel()
        for name in ("labels", "loss_mask", "target_mask", "position_ids"):
            assert getattr(self, name).shape == (num_tokens,), f"{name} has shape {getattr(self, name).shape}"
        assert self.cu_seqlens.dtype == torch.int32 and self.seq_lengths.dtype == torch.int32
        assert int(self.cu_seqlens[0]) == 0 and int(self.cu_seqlens[-1]) == num_tokens
        padded = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        if self.shared:
            self._validate_shared(padded)
        else:
            assert bool((padded >= self.seq_lengths).all()), "a padded length is below its real length"
        assert self.max_seqlen == int(padded.max())
        if pad_multiple is not None:
            assert bool((padded % pad_multiple == 0).all()), f"sequence not padded to {pad_multiple}"
        assert self.roles.shape == self.group_index.shape == self.seq_lengths.shape
        assert len(self.sample_ids) == self.sample_indices.numel()
        assert int(self.group_index.max()) < self.num_groups

    def _validate_shared(self, padded: Tensor) -> None:
        cu, pieces = self.cu_seqlens.long(), self.cu_pieces.long()
        assert self.cu_pieces.dtype == torch.int32 and self.branch_bounds.dtype == torch.int32
        assert int(pieces[0]) == 0 and int(pieces[-1]) == int(cu[-1])
        assert bool((pieces[1:] > pieces[:-1]).all()), "an empty piece"
        assert bool(torch.isin(cu, pieces).all()), "cu_pieces does not refine cu_seqlens"
        assert self.branch_bounds.shape == (padded.numel(), 2)
        a, b = self.branch_bounds[:, 0].long(), self.branch_bounds[:, 1].long()
        assert bool(((a <= b) & (b <= padded)).all())
        pairs = self.piece_sequences
        assert pairs.dim() == 2 and pairs.shape[1] == 2
        assert set(pairs[:, 1].tolist()) == set(range(self.num_sequences)), "a sequence has no piece"
        assert set(pairs[:, 0].tolist()) == set(range(pieces.numel() - 1)), "a piece has no sequence"
        # Each sequence's pieces add up to at least its real length (the last one holds padding).
        sizes = (pieces[1:] - pieces[:-1])[pairs[:, 0]]
        totals = torch.zeros(self.num_sequences, dtype=torch.long).index_add(0, pairs[:, 1], sizes)
        assert bool((totals >= self.seq_lengths.long()).all()), "pieces shorter than a sequence"

    def token_pieces(self, token_index: Optional[Tensor] = None) -> Tensor:
        """The piece of each token (``token_index``: global indices of the tokens, e.g. a CP
        rank's; default every token). Shared batches only."""
        pieces = self.cu_pieces.to(torch.long)
        if token_index is None:
            token_index = torch.arange(int(pieces[-1]), device=pieces.device)
        return torch.searchsorted(pieces, token_index.to(pieces.device), right=True) - 1

    def sequence_sums(self, values: Tensor, token_index: Optional[Tensor] = None) -> Tensor:
        """Per logical sequence, the sum of the per-token ``values`` (``[T]``, or the tokens at
        ``token_index``): each token counts for every sequence that contains it (a shared prefix
        for both). Differentiable; dtype of ``values``. Shared batches only."""
        pieces = self.token_pieces(token_index).to(values.device)
        num_pieces = self.cu_pieces.numel() - 1
        per_piece = torch.zeros(num_pieces, dtype=values.dtype, device=values.device)
        per_piece = per_piece.index_add(0, pieces, values)
        pairs = self.piece_sequences.to(values.device)
        out = torch.zeros(self.num_sequences, dtype=values.dtype, device=values.device)
        return out.index_add(0, pairs[:, 1], per_piece.index_select(0, pairs[:, 0]))

    def tokens_of_sequences(self, selected: Tensor) -> Tensor:
        """Bool ``[T]``: the tokens that belong to at least one selected logical sequence
        (``selected``: bool ``[S]``)."""
        selected = selected.cpu()
        if not self.shared:
            lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long().cpu()
            return torch.repeat_interleave(selected, lengths)
        pairs = self.piece_sequences.cpu()
        piece_selected = torch.zeros(self.cu_pieces.numel() - 1, dtype=torch.bool)
        piece_selected[pairs[selected[pairs[:, 1]], 0]] = True
        sizes = (self.cu_pieces[1:] - self.cu_pieces[:-1]).long().cpu()
        return torch.repeat_interleave(piece_selected, sizes)

    def rope_positions(self) -> Tensor:
        """Global position of every token from the metadata alone (equal to ``position_ids`` of
        the whole pack): offsets within each segment, the rejected branch of a shared segment
        moved back by the chosen branch's length. ``[T]`` int64, on the metadata's device."""
        cu = self.cu_seqlens.to(torch.long)
        lengths = cu[1:] - cu[:-1]
        offsets = torch.arange(int(cu[-1]), device=cu.device) - torch.repeat_interleave(cu[:-1], lengths)
        if not self.shared:
            return offsets
        bounds = self.branch_bounds.to(device=cu.device, dtype=torch.long)
        a = torch.repeat_interleave(bounds[:, 0], lengths)
        b = torch.repeat_interleave(bounds[:, 1], lengths)
        return torch.where(offsets >= b, offsets - (b - a), offsets)
