"""The Transformer Engine path (CUDA + TE): TE attention on packed THD micro-batches, and under
context parallelism with TE's own CP attention, against the reference path. Skipped (and reported
as skipped) without CUDA and TE; the CP test also needs two GPUs."""

import pytest
import torch

from tests.distributed.common import MIXED_SHAPES, check_layout
from tests.harness import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.te]

# bf16 compute: log-probs and gradients agree to bf16 accuracy, not fp32's 1e-5.
BF16_RTOL = 3e-2


def test_te_matches_reference_path_single_gpu():
    """TE layers + TE THD attention vs the reference layers, same weights, DP=1."""
    run_distributed(check_layout, 1, dict(), attention_backend="te",
                    reference_backend="reference", bf16=True, rtol=BF16_RTOL, backend="nccl",
                    shapes=MIXED_SHAPES)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for CP=2")
@pytest.mark.parametrize("cp_comm_type", ["p2p", "all_gather"])
def test_te_context_parallel_matches_cp1(cp_comm_type):
    run_distributed(check_layout, 2, dict(context_parallel_size=2, cp_comm_type=cp_comm_type),
                    attention_backend="te", bf16=True, rtol=BF16_RTOL, backend="nccl",
                    shapes=MIXED_SHAPES)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs for CP=2 x TP=2")
def test_te_context_parallel_with_tensor_parallel():
    run_distributed(check_layout, 4, dict(context_parallel_size=2, tensor_model_parallel_size=2,
                                          sequence_parallel=True),
                    attention_backend="te", bf16=True, rtol=BF16_RTOL, backend="nccl")
