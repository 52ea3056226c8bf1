"""Packing whole preference groups into THD micro-batches (the PackedMicroBatch contract)."""

import numpy as np
import pytest
import torch

from megatron_solopo.data import synthetic
from megatron_solopo.data.dataset import PreferenceDataset, PreferenceGroup
from megatron_solopo.data.packing import (build_micro_batches, group_num_tokens, pack_groups,
                                          pad_multiple_for, plan_micro_batches)
from megatron_solopo.data.preprocess import preprocess
from megatron_solopo.roles import ALL_ROLES, Role
from tests.unit.data_fixtures import SP, multi_turn_record, tokenizers, write_lines  # noqa: F401

SOLOPO_ROLES = [Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizers):
    root = tmp_path_factory.mktemp("packing")
    records = synthetic.generate_records("kv_retrieval", 24, seed=9, long_length=50)
    records += [multi_turn_record(i, num_turns=3) for i in range(2)]
    path = write_lines(root / "in.jsonl", records)
    preprocess([path], str(root / "ds"), SP, tokenizers[SP])
    return PreferenceDataset(str(root / "ds"))


def test_pad_multiple_for_context_and_sequence_parallelism():
    assert pad_multiple_for(1, 1, False) == 2
    assert pad_multiple_for(4, 8, False) == 8
    assert pad_multiple_for(4, 8, True) == 64
    # FP8: each rank's share of a sequence is a multiple of 16 tokens (TE's FP8 GEMM alignment)
    assert pad_multiple_for(1, 1, False, fp8=True) == 16
    assert pad_multiple_for(2, 4, True, fp8=True) == 128
    assert pad_multiple_for(2, 4, False, fp8=True) == 32


@pytest.mark.parametrize("cp,tp,sp", [(1, 1, False), (2, 1, False), (4, 2, True)])
def test_packs_hold_whole_groups_and_reproduce_the_stored_sequences(dataset, cp, tp, sp):
    pad = pad_multiple_for(cp, tp, sp)
    pad_id = dataset.metadata["pad_id"]
    indices = list(range(len(dataset)))[::-1]  # any order: packing keeps it
    batches = build_micro_batches(dataset, indices, SOLOPO_ROLES, 1200, pad, pad_id)
    assert len(batches) > 1
    seen = []
    for batch in batches:
        batch.validate(pad)
        assert batch.num_tokens <= 1200
        assert batch.cu_seqlens.dtype == torch.int32 and batch.tokens.dtype == torch.int64
        for g, sample in enumerate(batch.sample_indices.tolist()):
            group = dataset.get_group(sample, SOLOPO_ROLES)
            assert batch.sample_ids[g] == group.record_id
            in_group = (batch.group_index == g).nonzero()[:, 0].tolist()
            expected = [(role, tokens, mask) for role in SOLOPO_ROLES
                        for tokens, mask in group.sequences[role]]
            assert [Role.from_index(int(batch.roles[i])) for i in in_group] == [r for r, _, _ in expected]
            for i, (role, tokens, mask) in zip(in_group, expected):
                start, end = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
                length = int(batch.seq_lengths[i])
                assert length == len(tokens) and (end - start) % pad == 0 and end - start - length < pad
                assert batch.tokens[start:start + length].tolist() == tokens.tolist()
                assert (batch.tokens[start + length:end] == pad_id).all()
                assert batch.labels[start:start + length - 1].tolist() == tokens[1:].tolist()
                assert (batch.labels[start + length - 1:end] == 0).all()
                assert batch.loss_mask[start:end].tolist() == \
                    mask[1:].astype(float).tolist() + [0.0] * (end - start - length + 1)
                assert batch.target_mask[start:end].tolist() == \
                    [1.0] * (length - 1) + [0.0] * (end - start - length + 1)
                assert batch.position_ids[start:end].tolist() == list(range(end - start))
            seen.append(sample)
        assert batch.max_seqlen == int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    assert seen == indices  # every group exactly once, in the order given


def test_loss_mask_sums_to_the_response_tokens(dataset):
    """The masked sum of per-token log-probs is logp(y|x): one target per response token."""
    batch = pack_groups([dataset.get_group(i, ALL_ROLES) for i in (0, 24)], ALL_ROLES, 4, 0)
    for s in range(batch.num_sequences):
        start, end = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        group = dataset.get_group(int(batch.sample_indices[int(batch.group_index[s])]), ALL_ROLES)
        role = Role.from_index(int(batch.roles[s]))
        masks = [m for _, m in group.sequences[role]]
        turn = [int(x) for x in (batch.roles[:s] == batch.roles[s]).nonzero()[:, 0]
                if int(batch.group_index[x]) == int(batch.group_index[s])]
        # a response never starts at a sequence's first token, so every response token is a target
        assert batch.loss_mask[start:end].sum() == masks[len(turn)].sum()
    # multi-turn record m0: 3 short sequences per short role, one long sequence per long role
    g = 1
    tags = batch.roles[batch.group_index == g].tolist()
    assert tags == [0, 0, 0, 1, 1, 1, 2, 3]


def test_group_sizes_and_greedy_plan(dataset):
    group = dataset.get_group(0, SOLOPO_ROLES)
    lengths = [len(t) for role in SOLOPO_ROLES for t, _ in group.sequences[role]]
    assert group_num_tokens(group, SOLOPO_ROLES, 8) == sum(-(-n // 8) * 8 for n in lengths)
    assert dataset.sequence_lengths(0, SOLOPO_ROLES) == lengths
    assert plan_micro_batches([300, 400, 400, 100], 800) == [[0, 1], [2, 3]]
    assert plan_micro_batches([800, 1, 799], 800) == [[0], [1, 2]]


def test_group_over_budget_names_the_record_and_its_size():
    with pytest.raises(ValueError, match=r"record 'big' needs 1200 tokens \(padding included\), more "
                                         "than the micro-batch budget "
                                         "data.max_tokens_per_micro_batch=1000"):
        plan_micro_batches([300, 1200], 1000, ["small", "big"])


def test_build_micro_batches_refuses_a_group_over_budget(dataset):
    size = group_num_tokens(dataset.get_group(3, SOLOPO_ROLES), SOLOPO_ROLES, 2)
    with pytest.raises(ValueError, match=f"record '{dataset.record_id(3)}' needs {size} tokens"):
        build_micro_batches(dataset, [3], SOLOPO_ROLES, size - 1, 2, 0)


def test_pack_groups_errors():
    group = PreferenceGroup(0, "r0", {Role.SHORT_CHOSEN: [(np.array([5, 6, 7], dtype=np.int32),
                                                           np.array([0, 1, 1], dtype=bool))]})
    with pytest.raises(ValueError, match="at least one group"):
        pack_groups([], [Role.SHORT_CHOSEN], 2, 0)
    with pytest.raises(ValueError, match="record 'r0': no long/chosen sequence"):
        pack_groups([group], [Role.LONG_CHOSEN], 2, 0)
    batch = pack_groups([group], [Role.SHORT_CHOSEN], 4, 9)
    batch.validate(4)
    assert batch.tokens.tolist() == [5, 6, 7, 9] and batch.labels.tolist() == [6, 7, 0, 0]
    assert batch.loss_mask.tolist() == [1, 1, 0, 0] and batch.target_mask.tolist() == [1, 1, 0, 0]
    assert batch.cu_seqlens.tolist() == [0, 4] and batch.max_seqlen == 4


@pytest.mark.parametrize("pad", [1, 2, 8])
@pytest.mark.parametrize("roles", [SOLOPO_ROLES, [Role.SHORT_CHOSEN], list(ALL_ROLES)[2:]])
def test_group_sizes_from_the_index_equal_the_packed_sizes(dataset, pad, roles):
    sizes = dataset.group_sizes(roles, pad)
    assert sizes.shape == (len(dataset),)
    for index in range(len(dataset)):
        group = dataset.get_group(index, roles)
        assert int(sizes[index]) == group_num_tokens(group, roles, pad)


def test_split_to_at_least_keeps_order_and_stops_at_single_groups():
    from megatron_solopo.data.packing import split_to_at_least

    assert split_to_at_least([[0, 1, 2, 3, 4]], 3) == [[0, 1], [2], [3, 4]]
    plan = split_to_at_least([[0, 1, 2, 3, 4], [5]], 4)
    assert len(plan) == 4 and [i for members in plan for i in members] == list(range(6))
    assert all(members for members in plan)
    assert split_to_at_least([[0], [1]], 4) == [[0], [1]]  # cannot: one group each already
    assert split_to_at_least([[0, 1], [2]], 1) == [[0, 1], [2]]


def test_min_micro_batches_splits_a_step_that_packs_into_too_few(dataset):
    pad_id = dataset.metadata["pad_id"]
    few = build_micro_batches(dataset, list(range(6)), SOLOPO_ROLES, 100_000, 2, pad_id)
    assert len(few) == 1
    many = build_micro_batches(dataset, list(range(6)), SOLOPO_ROLES, 100_000, 2, pad_id,
                               min_micro_batches=4)
    assert len(many) == 4
    assert [i for batch in many for i in batch.sample_indices.tolist()] == list(range(6))


# ---------------------------------------------------------------------------------------------
# Shared-prefix packing (data.shared_prefix)
# ---------------------------------------------------------------------------------------------
def _sequence_view(batch, s):
    """Logical sequence ``s`` of a shared pack: the concatenation of its pieces, per field."""
    pairs = batch.piece_sequences
    pieces = sorted(int(p) for p in pairs[pairs[:, 1] == s, 0])
    index = torch.cat([torch.arange(int(batch.cu_pieces[p]), int(batch.cu_pieces[p + 1]))
                       for p in pieces])
    length = int(batch.seq_lengths[s])
    return {name: getattr(batch, name)[index][:length]
            for name in ("tokens", "labels", "loss_mask", "target_mask", "position_ids")}


@pytest.mark.parametrize("roles", [list(ALL_ROLES), SOLOPO_ROLES, list(ALL_ROLES)[2:]])
@pytest.mark.parametrize("pad", [2, 8])
def test_shared_packs_hold_every_sequence_exactly(dataset, roles, pad):
    """Each logical sequence, read through its pieces, has the unshared pack's tokens, targets,
    masks and positions; the per-sequence metadata and order are those of the unshared pack."""
    indices = [0, 24, 5, 25]  # single-turn and multi-turn records
    groups = [dataset.get_group(i, roles) for i in indices]
    plain = pack_groups(groups, roles, pad, 0)
    shared = pack_groups(groups, roles, pad, 0, shared_prefix=True)
    shared.validate(pad)
    assert shared.shared and shared.num_tokens < plain.num_tokens
    for name in ("roles", "group_index", "seq_lengths", "sample_indices"):
        assert torch.equal(getattr(shared, name), getattr(plain, name)), name
    assert shared.num_tokens == sum(group_num_tokens(g, roles, pad, True) for g in groups)
    assert torch.equal(shared.rope_positions(), shared.position_ids)
    for s in range(plain.num_sequences):
        start = int(plain.cu_seqlens[s])
        length = int(plain.seq_lengths[s])
        view = _sequence_view(shared, s)
        for name, values in view.items():
            assert torch.equal(values, getattr(plain, name)[start:start + length]), (s, name)
    # token counts and response sums through the piece map equal the unshared ones
    from megatron_solopo.parallel.context_parallel import segment_sum

    for mask in ("loss_mask", "target_mask"):
        torch.testing.assert_close(shared.sequence_sums(getattr(shared, mask)),
                                   segment_sum(getattr(plain, mask), plain.cu_seqlens))
    # The long pair of every record shares its document: long/rejected is a prefix piece plus
    # its own branch.
    pairs = shared.piece_sequences
    for s in (shared.roles == Role.LONG_REJECTED.index).nonzero()[:, 0].tolist():
        assert int((pairs[:, 1] == s).sum()) == 2


def test_shared_prefix_length_stops_before_the_first_difference():
    from megatron_solopo.data.packing import shared_prefix_length

    def seq(ids, response_from):
        mask = np.zeros(len(ids), bool)
        mask[response_from:] = True
        return np.array(ids), mask

    assert shared_prefix_length(seq([1, 2, 3, 4], 3), seq([1, 2, 3, 5], 3)) == 2
    # a common first answer token is shared too (same tokens, same response mask)
    assert shared_prefix_length(seq([1, 2, 3, 4, 6], 2), seq([1, 2, 3, 4, 7], 2)) == 3
    # the same tokens with different response masks are not shared
    assert shared_prefix_length(seq([1, 2, 3, 4], 2), seq([1, 2, 3, 5], 3)) == 1
    assert shared_prefix_length(seq([1, 9], 1), seq([2, 9], 1)) == 0
    assert shared_prefix_length(seq([1, 2, 3], 1), seq([1, 2, 3], 1)) == 2


def test_unshareable_pairs_stay_unshared_and_padding_extends_the_last_segment():
    def seq(ids, response_from):
        mask = np.zeros(len(ids), bool)
        mask[response_from:] = True
        return np.array(ids), mask

    group = PreferenceGroup(0, "r0", {Role.SHORT_CHOSEN: [seq([1, 5, 6], 2)],
                                      Role.SHORT_REJECTED: [seq([2, 5, 7], 2)],
                                      Role.LONG_CHOSEN: [seq([1, 3, 3, 3, 5, 6], 5)],
                                      Role.LONG_REJECTED: [seq([1, 3, 3, 3, 5, 8, 8], 5)]})
    batch = pack_groups([group], ALL_ROLES, 2, 0, shared_prefix=True)
    batch.validate(2)
    # short pair differs at its first token: two plain segments; the long pair shares 4 tokens
    assert batch.cu_seqlens.tolist() == [0, 4, 8, 18]
    assert batch.branch_bounds.tolist() == [[4, 4], [4, 4], [4, 6]]
    assert batch.tokens[8:17].tolist() == [1, 3, 3, 3, 5, 6, 5, 8, 8]
    assert batch.position_ids[8:18].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]
    padded = batch.padded_to(24)
    padded.validate()
    assert padded.position_ids[17:].tolist() == [7, 8, 9, 10, 11, 12, 13]
    assert torch.equal(padded.rope_positions(), padded.position_ids)
    assert int(padded.cu_pieces[-1]) == 24
    # nothing shareable at all: the batch is a plain one
    plain = pack_groups([group], [Role.SHORT_CHOSEN, Role.SHORT_REJECTED], 2, 0, shared_prefix=True)
    assert not plain.shared


def test_builder_budget_check_with_sharing_is_a_lower_bound(dataset):
    """With sharing, a record that fits only because its context is packed once is accepted at
    start (the exact size is checked when it is packed)."""
    from megatron_solopo.training.batches import MicroBatchBuilder

    roles = list(ALL_ROLES)[2:]
    index = 3
    group = dataset.get_group(index, roles)
    shared_size = group_num_tokens(group, roles, 2, True)
    assert shared_size < group_num_tokens(group, roles, 2)
    budget = max(group_num_tokens(dataset.get_group(i, roles), roles, 2, True)
                 for i in range(len(dataset)))
    with pytest.raises(ValueError, match="do not fit one micro-batch"):
        MicroBatchBuilder(dataset, roles, token_budget=budget, pad_multiple=2, pad_token_id=0,
                          fixed_length=False)
    builder = MicroBatchBuilder(dataset, roles, token_budget=budget, pad_multiple=2,
                                pad_token_id=0, fixed_length=False, shared_prefix=True)
    step = builder.build([index, 0], 2)
    assert all(batch.shared and batch.num_tokens <= budget for batch in step.micro_batches)
