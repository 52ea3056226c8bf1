"""Log-probs from vocab-parallel logits (TP=1 here; TP>1 in tests/distributed) and the CP helpers."""

import pytest
import torch

from megatron_solopo.model.logprobs import mask_padded_vocab, masked_sequence_sums, token_logprobs
from megatron_solopo.parallel import context_parallel as cpar
from megatron_solopo.parallel.distributed import DistributedEnv, destroy_distributed, initialize_distributed
from megatron_solopo.parallel.layout import ParallelConfig
from tests.batches import random_packed_batch
from tests.harness import free_port


@pytest.fixture(scope="module")
def single_process_megatron():
    initialize_distributed(ParallelConfig(), DistributedEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    yield
    destroy_distributed()


def test_token_logprobs_match_float64_log_softmax(single_process_megatron):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, 50, generator=gen) * 4
    labels = torch.randint(0, 40, (7, 3), generator=gen)
    original = logits.clone()
    logps = token_logprobs(logits, labels, vocab_size=40)
    reference = torch.log_softmax(logits.double()[..., :40], -1).gather(-1, labels[..., None])[..., 0]
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(logits, original), "fp32 logits must survive (megatron's CE works in place)"


def test_bf16_logits_give_fp32_logprobs(single_process_megatron):
    logits = torch.randn(5, 32).bfloat16()
    labels = torch.randint(0, 32, (5,))
    logps = token_logprobs(logits, labels)
    reference = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), reference, rtol=1e-5, atol=1e-5)


def test_padded_vocab_is_masked_even_when_a_shard_is_all_padding():
    logits = torch.randn(4, 16)
    masked = mask_padded_vocab(logits, vocab_size=20, tp_rank=1)  # ids 16..31, 20..31 padding
    assert torch.equal(masked[:, :4], logits[:, :4]) and bool((masked[:, 4:] < -1e29).all())
    assert mask_padded_vocab(logits, vocab_size=20, tp_rank=0) is logits
    assert bool((mask_padded_vocab(logits, vocab_size=20, tp_rank=2) < -1e29).all())


def test_masked_sequence_sums():
    values = torch.arange(10, dtype=torch.float32)
    mask = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 0, 1], dtype=torch.float32)
    sums = masked_sequence_sums(values, mask, torch.tensor([0, 4, 8, 10]))
    assert sums.tolist() == [0 + 1, 4 + 5 + 6, 9]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_zigzag_shards_cover_every_token_once_and_unshard_inverts(cp_size):
    batch = random_packed_batch([[13, 9], [21], [3, 30]], 50, 2 * cp_size, seed=1)
    shards = [cpar.shard_micro_batch(batch, cp_size, rank) for rank in range(cp_size)]
    for shard in shards:
        assert shard.num_tokens == batch.num_tokens // cp_size
        assert torch.equal(shard.cu_seqlens, batch.cu_seqlens)  # metadata stays global
    indices = torch.cat([cpar.zigzag_indices(batch.cu_seqlens, cp_size, r) for r in range(cp_size)])
    assert sorted(indices.tolist()) == list(range(batch.num_tokens))
    for name in cpar.TOKEN_FIELDS:
        restored = cpar.unshard_tokens([getattr(s, name) for s in shards], batch.cu_seqlens)
        assert torch.equal(restored, getattr(batch, name))


def test_zigzag_layout_is_load_balanced_chunks():
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)  # lengths 8 and 16, CP=2: chunks of 2 and 4
    assert cpar.zigzag_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert cpar.zigzag_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19]
    assert cpar.local_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11]


def test_unpadded_sequence_is_rejected_with_its_index():
    with pytest.raises(ValueError, match="sequence 1 has padded length 6, not a multiple of 2\\*CP=4"):
        cpar.zigzag_indices(torch.tensor([0, 8, 14]), 2, 0)


def test_segment_sum_keeps_gradient():
    values = torch.randn(6, requires_grad=True)
    sums = cpar.segment_sum(values, torch.tensor([0, 2, 6]))
    (sums * torch.tensor([1.0, 2.0])).sum().backward()
    assert values.grad.tolist() == [1, 1, 2, 2, 2, 2]


def test_logprob_head_computes_bf16_models_logits_in_fp32(single_process_megatron):
    """The head's logits reach the softmax in fp32 (a bf16 matmul output would be rounded by
    ~1e-2 first), and the output layer's forward pre-hooks run although the layer is not called
    (Megatron DDP waits there for the weight's all-gather under overlap_param_gather)."""
    from megatron_solopo.model.logprobs import LogprobHead

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 1, 32, generator=gen).bfloat16()  # logits of std ~6
    layer = torch.nn.Linear(32, 40, bias=False).bfloat16()
    layer.tp_group, layer.sequence_parallel = None, False
    calls = []
    layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    labels = torch.randint(0, 36, (1, 6), generator=gen)
    needed = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    with torch.no_grad():
        out = LogprobHead(vocab_size=36, chunk_size=4)(
            hidden_states=hidden, output_layer=layer, output_weight=None, labels=labels,
            context=needed)
    logits = hidden[:, 0].double() @ layer.weight.double().t()
    reference = torch.log_softmax(logits[:, :36], -1).gather(-1, labels[0, :, None])[:, 0]
    assert out.dtype == torch.float32 and calls == [layer]
    torch.testing.assert_close(out[needed].double(), reference[needed], rtol=1e-5, atol=1e-5)
    assert bool((out[~needed] == 0).all())
