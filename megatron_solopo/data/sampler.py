"""Deterministic shuffling, data-parallel sharding and exact resume (Megatron's vocabulary:
"consumed samples" = preference groups consumed by all data-parallel ranks so far)."""

from __future__ import annotations

from typing import Iterator

import numpy as np


class PreferenceSampler:
    """Yields, per global batch, the record indices of one data-parallel rank.

    Epoch ``e`` visits the records in ``permutation(seed, e)`` (or in order without shuffling);
    each global batch is ``global_batch_size`` consecutive entries of it, and rank ``r`` takes the
    ``r``-th of ``data_parallel_size`` equal slices. The last incomplete global batch of an epoch
    is dropped. Iteration is endless (epochs roll over) and starts at ``consumed_samples``, so a
    resumed run sees exactly the groups the uninterrupted run would have seen next.
    """

    def __init__(self, num_samples: int, global_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, *, seed: int, consumed_samples: int = 0,
                 shuffle: bool = True):
        if global_batch_size % data_parallel_size != 0:
            raise ValueError(f"training.global_batch_size={global_batch_size} is not divisible by "
                             f"the data-parallel size {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} not in [0, {data_parallel_size})")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} records, fewer than one global batch "
                             f"(training.global_batch_size={global_batch_size})")
        if consumed_samples % global_batch_size != 0:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of "
                             f"global_batch_size={global_batch_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank = data_parallel_rank
        self.dp_size = data_parallel_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle
        self.batches_per_epoch = num_samples // global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch = epoch
            self._cached_order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                                  if self.shuffle else np.arange(self.num_samples))
        return self._cached_order

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.consumed_samples // self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size
        while True:
            epoch, within = divmod(batch, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            start = within * self.global_batch_size + self.rank * per_rank
            yield order[start:start + per_rank].tolist()
            batch += 1
