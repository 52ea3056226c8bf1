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


# Qwen3's per-head q/k RMSNorm (TENorm in the TE spec) with YaRN (its attention factor lives in
# the softmax scale, model/rope.py).
QWEN3_YARN = dict(family="qwen3", qk_layernorm=True, kv_channels=32, max_position_embeddings=64,
                  rope_scaling={"type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 16})


def test_te_qwen3_yarn_matches_reference_path_single_gpu():
    run_distributed(check_layout, 1, dict(), attention_backend="te",
                    reference_backend="reference", bf16=True, rtol=BF16_RTOL, backend="nccl",
                    shapes=MIXED_SHAPES, model_overrides=QWEN3_YARN)


def _te_softmax_scales(model_fields: dict, attention_backend: str = "te"):
    """Rank function: the softmax scale every TE core attention of a built model uses, and the
    TransformerConfig's."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from tests.distributed.common import tiny_model

    model = tiny_model(**model_fields, attention_backend=attention_backend)
    initialize_distributed(ParallelConfig(), model=model)
    config = build_transformer_config(model, ParallelConfig())
    (gpt,) = build_model(model, config)
    scales = {float(layer.self_attention.core_attention.softmax_scale)
              for layer in gpt.decoder.layers}
    norms = {type(layer.self_attention.q_layernorm).__name__ for layer in gpt.decoder.layers}
    return sorted(scales), config.softmax_scale, sorted(norms)


def test_te_attention_uses_the_yarn_softmax_scale():
    """The YaRN attention factor reaches TE's attention (fp32 parity with transformers is on CPU,
    tests/distributed/test_model_families.py; bf16 could not see a 1e-3 change)."""
    ((scales, expected, norms),) = run_distributed(_te_softmax_scales, 1, QWEN3_YARN,
                                                   backend="nccl")
    assert expected is not None and expected > 1 / 32 ** 0.5
    assert scales == [pytest.approx(expected, rel=1e-12)]
    assert norms and "IdentityOp" not in norms  # q/k norms exist (TE's RMSNorm)
