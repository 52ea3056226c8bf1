"""Deterministic shuffling, data-parallel sharding and exact resume (docs/data.md "Sampling").

Megatron's vocabulary: a *sample* is one preference group (one record); *consumed samples* is
the number of samples all data-parallel ranks together have trained on, saved in every checkpoint.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class PreferenceSampler:
    """Yields, per global batch (one optimizer step), the record indices of one data-parallel rank.

    Epoch ``e`` visits the records in ``permutation(seed, e)`` (in order with ``shuffle=False``).
    A global batch is ``global_batch_size`` consecutive entries of that order and rank ``r`` takes
    the ``r``-th of ``data_parallel_size`` equal slices, so the ranks' indices of a step are
    disjoint and together form the global batch.

    - ``drop_last=True`` (Megatron's default): the last, incomplete global batch of each epoch is
      dropped (a different tail each epoch when shuffling); every step stays within one epoch.
    - ``drop_last=False``: the epochs' orders are concatenated into one stream, so a global batch
      may end one epoch and start the next (and then may hold a record once from each) and no
      record is ever left out.

    Iteration never ends (epochs roll over) and starts after ``consumed_samples``: a run resumed
    from a checkpoint sees exactly the groups the uninterrupted run would have seen next.
    """

    def __init__(self, num_samples: int, global_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, seed: int, consumed_samples: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} and data_parallel_size="
                             f"{data_parallel_size} must be >= 1")
        if global_batch_size % data_parallel_size != 0:
            raise ValueError(f"training.global_batch_size={global_batch_size} is not divisible by "
                             f"the data-parallel size {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} not in [0, {data_parallel_size})")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} records, fewer than one global batch "
                             f"(training.global_batch_size={global_batch_size})")
        if num_samples < 1:
            raise ValueError("the dataset has no records")
        if consumed_samples < 0 or consumed_samples % global_batch_size != 0:
            raise ValueError(f"consumed_samples={consumed_samples} is not a non-negative multiple "
                             f"of global_batch_size={global_batch_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.samples_per_rank = global_batch_size // data_parallel_size
        self._order_cache: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    @property
    def batches_per_epoch(self) -> int:
        """Complete global batches per epoch (``drop_last=True``)."""
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the records."""
        if self._order_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                     if self.shuffle else np.arange(self.num_samples))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def epoch_of(self, consumed_samples: int) -> int:
        """The epoch the next global batch after ``consumed_samples`` starts in."""
        step = consumed_samples // self.global_batch_size
        if self.drop_last:
            return step // self.batches_per_epoch
        return consumed_samples // self.num_samples

    def global_batch(self, step: int) -> list[int]:
        """All ranks' indices of global batch ``step`` (counted from the start of training)."""
        if self.drop_last:
            epoch, within = divmod(step, self.batches_per_epoch)
            start = within * self.global_batch_size
            return self.epoch_order(epoch)[start:start + self.global_batch_size].tolist()
        position = step * self.global_batch_size  # in the stream of concatenated epochs
        out: list[int] = []
        while len(out) < self.global_batch_size:
            epoch, offset = divmod(position, self.num_samples)
            take = min(self.global_batch_size - len(out), self.num_samples - offset)
            out.extend(self.epoch_order(epoch)[offset:offset + take].tolist())
            position += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.consumed_samples // self.global_batch_size
        first = self.data_parallel_rank * self.samples_per_rank
        while True:
            yield self.global_batch(step)[first:first + self.samples_per_rank]
            step += 1
