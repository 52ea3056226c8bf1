"""Shared-prefix packing on CUDA: the fast attention paths against the unshared fp32 reference
(tests/distributed/shared_common.py), forward and backward. FlexAttention (compiled, no
Transformer Engine needed) and Transformer Engine (THD query/key-value segments with
``padding_causal_bottom_right``, context parallelism off). Skipped without CUDA (and TE for the
TE tests)."""

import pytest
import torch

from tests.distributed.shared_common import check_shared_prefix
from tests.harness import run_distributed

pytestmark = pytest.mark.gpu

# Flex in fp32 (its kernels accumulate in fp32 but may reorder sums); TE computes in bf16.
FLEX_RTOL = 1e-3
BF16_RTOL = 3e-2


@pytest.mark.parametrize("objective", ["long_dpo", "longpo_multiturn", "solopo_both"])
def test_flex_shared_prefix_matches_unshared_reference(objective):
    pytest.importorskip("torch.nn.attention.flex_attention")
    run_distributed(check_shared_prefix, 1, dict(), objective, attention_backend="flex",
                    rtol=FLEX_RTOL, backend="nccl")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for CP=2")
def test_flex_shared_prefix_under_context_parallelism():
    run_distributed(check_shared_prefix, 2, dict(context_parallel_size=2), "longpo_multiturn",
                    attention_backend="flex", rtol=FLEX_RTOL, backend="nccl")


@pytest.mark.te
@pytest.mark.parametrize("objective", ["long_dpo", "longpo_multiturn", "solopo_both"])
def test_transformer_engine_shared_prefix_matches_unshared_reference(objective):
    run_distributed(check_shared_prefix, 1, dict(), objective, attention_backend="te",
                    rtol=BF16_RTOL, bf16=True, backend="nccl")


def test_transformer_engine_with_context_parallelism_packs_unshared():
    from megatron_solopo.model.build import supports_shared_prefix, te_available

    if not te_available():
        pytest.skip("Transformer Engine is not importable")
    assert supports_shared_prefix("te", 1) and not supports_shared_prefix("te", 2)
