"""The model-FLOP count (training/metrics.py::forward_flops) against a brute-force count of the
(query, key) pairs each attention layout computes."""

import itertools

import pytest

from megatron_solopo.model.config import ModelConfig
from megatron_solopo.training.metrics import forward_flops

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=256)


def attended_pairs(length: int, a: int, b: int) -> int:
    """Pairs (query i, key j) of one segment: causal, and the rejected branch (queries >= b) never
    sees the chosen branch [a, b) (data/batch.py)."""
    return sum(1 for i, j in itertools.product(range(length), repeat=2)
               if j <= i and not (a <= j < b <= i))


@pytest.mark.parametrize("length,a,b", [(12, 5, 8), (30, 20, 25), (9, 1, 5), (16, 16, 16)])
def test_shared_segment_pairs_match_the_mask(length, a, b):
    per_pair = MODEL.num_layers * 4 * MODEL.num_attention_heads * MODEL.kv_channels
    dense = forward_flops(MODEL, [length], 0, 256, [(length, length)]) \
        - per_pair * length * length / 2
    shared = forward_flops(MODEL, [length], 0, 256, [(a, b)]) - dense
    # The formula counts L^2/2 per causal block; the exact count adds the diagonal, L/2.
    assert shared / per_pair + length / 2 == attended_pairs(length, a, b)


def test_unshared_default_and_packing():
    # No bounds: every segment is one causal sequence; packing bills each sequence separately.
    assert forward_flops(MODEL, [10, 6], 3, 256) == forward_flops(MODEL, [10, 6], 3, 256,
                                                                   [(10, 10), (6, 6)])
    assert forward_flops(MODEL, [16], 0, 256) > forward_flops(MODEL, [10, 6], 0, 256)
