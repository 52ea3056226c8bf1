"""Random packed micro-batches built directly from the PackedMicroBatch contract (independent of
the data pipeline, so model/parallel tests do not depend on it)."""

from __future__ import annotations

import torch

from megatron_solopo.data.batch import PackedMicroBatch
from megatron_solopo.roles import Role


def random_packed_batch(groups: list[list[int]], vocab_size: int, pad_multiple: int, seed: int,
                        roles: tuple[Role, ...] = (Role.SHORT_CHOSEN, Role.SHORT_REJECTED),
                        first_sample: int = 0, response_tokens=None) -> PackedMicroBatch:
    """``groups[g]`` lists the real lengths of group g's sequences (one per role, in order).
    The second half of each sequence (at least one token) is its response, or its last
    ``response_tokens`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens, labels, loss_mask, target_mask, positions = [], [], [], [], []
    cu, lengths, role_tags, group_index = [0], [], [], []
    for g, seq_lengths in enumerate(groups):
        for s, length in enumerate(seq_lengths):
            padded = -(-length // pad_multiple) * pad_multiple
            ids = torch.randint(1, vocab_size, (length,), generator=gen)
            prompt = max(1, length // 2 if response_tokens is None else length - response_tokens)
            seq_tokens = torch.zeros(padded, dtype=torch.long)
            seq_tokens[:length] = ids
            seq_labels = torch.zeros(padded, dtype=torch.long)
            seq_labels[:length - 1] = ids[1:]
            real_target = torch.zeros(padded)
            real_target[:length - 1] = 1
            response_target = torch.zeros(padded)
            response_target[prompt - 1:length - 1] = 1  # targets prompt..length-1 are response
            tokens.append(seq_tokens)
            labels.append(seq_labels)
            loss_mask.append(response_target)
            target_mask.append(real_target)
            positions.append(torch.arange(padded))
            cu.append(cu[-1] + padded)
            lengths.append(length)
            role_tags.append(roles[s % len(roles)].index)
            group_index.append(g)
    batch = PackedMicroBatch(
        tokens=torch.cat(tokens), labels=torch.cat(labels), loss_mask=torch.cat(loss_mask),
        target_mask=torch.cat(target_mask), position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        seq_lengths=torch.tensor(lengths, dtype=torch.int32),
        roles=torch.tensor(role_tags), group_index=torch.tensor(group_index),
        sample_indices=torch.arange(first_sample, first_sample + len(groups)),
        sample_ids=[f"sample-{first_sample + g}" for g in range(len(groups))],
        max_seqlen=max(c1 - c0 for c0, c1 in zip(cu[:-1], cu[1:])),
    )
    batch.validate(pad_multiple)
    return batch
