"""Deterministic shuffling, data-parallel sharding and exact resume from consumed samples."""

import itertools

import pytest

from megatron_solopo.data.sampler import PreferenceSampler


def take(sampler, steps: int) -> list:
    return list(itertools.islice(iter(sampler), steps))


def global_batches(num_samples, global_batch_size, dp, steps, **kwargs) -> list:
    """Per step, the concatenation of every rank's indices (rank order)."""
    ranks = [take(PreferenceSampler(num_samples, global_batch_size, r, dp, **kwargs), steps)
             for r in range(dp)]
    return [sum((ranks[r][step] for r in range(dp)), []) for step in range(steps)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_data_parallel_ranks_split_each_global_batch(drop_last):
    sampler = PreferenceSampler(50, 8, 0, 4, seed=1, drop_last=drop_last)
    steps = global_batches(50, 8, 4, 20, seed=1, drop_last=drop_last)
    for step, union in enumerate(steps):
        assert union == sampler.global_batch(step) and len(union) == 8
        if drop_last:  # disjoint ranks (without drop_last a step straddling two epochs may
            assert len(set(union)) == 8  # hold a record once from each)
    ranks = take(PreferenceSampler(50, 8, 3, 4, seed=1, drop_last=drop_last), 2)
    assert all(len(indices) == 2 for indices in ranks)


def test_each_epoch_is_a_permutation_and_drop_last_drops_only_the_tail():
    steps = global_batches(50, 8, 2, 12, seed=3)
    epoch0, epoch1 = sum(steps[:6], []), sum(steps[6:], [])
    assert len(set(epoch0)) == len(set(epoch1)) == 48  # 6 full batches, 2 records dropped
    assert epoch0 != epoch1 and set(range(50)) - set(epoch0) != set(range(50)) - set(epoch1)


def test_without_drop_last_the_epochs_form_one_stream():
    steps = global_batches(50, 8, 2, 25, seed=3, drop_last=False)  # 200 samples = 4 epochs
    stream = sum(steps, [])
    for epoch in range(4):
        assert sorted(stream[50 * epoch:50 * (epoch + 1)]) == list(range(50))
    sampler = PreferenceSampler(50, 8, 0, 1, seed=3, drop_last=False)
    assert stream[:50] == sampler.epoch_order(0).tolist()
    assert sampler.epoch_of(48) == 0 and sampler.epoch_of(56) == 1


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_resume_yields_exactly_the_remaining_order_across_epochs(drop_last, dp):
    full = global_batches(50, 8, dp, 20, seed=7, drop_last=drop_last)
    for done in (1, 5, 6, 7, 13):  # 6 batches per epoch with drop_last: 6 and 7 straddle it
        resumed = global_batches(50, 8, dp, 20 - done, seed=7, drop_last=drop_last,
                                 consumed_samples=8 * done)
        assert resumed == full[done:]


def test_order_depends_only_on_seed_and_epoch():
    a = PreferenceSampler(100, 10, 0, 1, seed=5)
    b = PreferenceSampler(100, 10, 0, 2, seed=5)
    assert a.epoch_order(3).tolist() == b.epoch_order(3).tolist()
    assert a.epoch_order(3).tolist() != PreferenceSampler(100, 10, 0, 1, seed=6).epoch_order(3).tolist()
    assert take(PreferenceSampler(16, 8, 0, 1, seed=0, shuffle=False), 3) == \
        [list(range(8)), list(range(8, 16)), list(range(8))]


@pytest.mark.parametrize("args,kwargs,message", [
    ((50, 6, 0, 4), {}, "global_batch_size=6 is not divisible by the data-parallel size 4"),
    ((5, 8, 0, 1), {}, "fewer than one global batch"),
    ((50, 8, 2, 2), {}, r"data_parallel_rank=2 not in \[0, 2\)"),
    ((50, 8, 0, 1), {"consumed_samples": 12}, "consumed_samples=12 is not a non-negative multiple"),
])
def test_sampler_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceSampler(*args, seed=0, **kwargs)


def test_small_dataset_without_drop_last():
    steps = take(PreferenceSampler(5, 8, 0, 1, seed=0, drop_last=False), 5)  # 40 = 8 epochs
    stream = sum(steps, [])
    assert all(sorted(stream[5 * e:5 * (e + 1)]) == list(range(5)) for e in range(8))
