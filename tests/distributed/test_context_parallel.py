"""Context parallelism on packed micro-batches (reference attention, gloo): CP=2, CP=4 and
CP=2 x TP=2 give the CP=1 model's per-token log-probs, per-sequence sums, DPO-style loss and
parameter gradients (fp32, 1e-5 relative), with sequence lengths that are not multiples of the
chunk size and short and long sequences in one pack."""

import pytest

from tests.distributed.common import MIXED_SHAPES, check_layout
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "cp2": (2, dict(context_parallel_size=2)),
    "cp4": (4, dict(context_parallel_size=4)),
    "cp2_tp2": (4, dict(context_parallel_size=2, tensor_model_parallel_size=2)),
    "cp2_tp2_sp": (4, dict(context_parallel_size=2, tensor_model_parallel_size=2,
                           sequence_parallel=True)),
    "cp2_pp2": (4, dict(context_parallel_size=2, pipeline_model_parallel_size=2)),
    "cp2_dp2": (4, dict(context_parallel_size=2)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_matches_cp1(name):
    world, fields = LAYOUTS[name]
    results = run_distributed(check_layout, world, fields)
    assert sum(r["checked_micro_batches"] for r in results) >= 1


@pytest.mark.parametrize("cp", [2, 4])
def test_mixed_short_and_long_sequences(cp):
    run_distributed(check_layout, cp, dict(context_parallel_size=cp), shapes=MIXED_SHAPES)


def test_one_micro_batch_vs_several_give_same_gradients():
    """The loss-scaling contract (training/loss.py) with CP: M=1 and M=4 (same global batch is
    compared with the single-process reference inside check_layout)."""
    run_distributed(check_layout, 2, dict(context_parallel_size=2), num_microbatches=1)
    run_distributed(check_layout, 2, dict(context_parallel_size=2), num_microbatches=4)


@pytest.mark.parametrize("cp", [2, 4])
def test_rank_without_response_tokens_still_joins_backward(cp):
    """The LM head runs on response positions only; with 2-token responses some CP ranks hold
    none of them, yet their backward must run (the attention's K/V gradient exchange)."""
    run_distributed(check_layout, cp, dict(context_parallel_size=cp), shapes=MIXED_SHAPES,
                    response_tokens=2, response_logprobs_only=True, timeout=120)
