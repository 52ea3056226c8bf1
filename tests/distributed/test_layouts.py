"""Every parallel layout gives the single-process model's per-token log-probs, loss and gradients
(fp32, 1e-5 relative) on the same weights and packed micro-batches."""

import pytest

from tests.distributed.common import check_layout
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2_1f1b": dict(pipeline_model_parallel_size=2),
    "pp2_vpp2_interleaved": dict(pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2),
    "dp2": dict(),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name):
    results = run_distributed(check_layout, 2, LAYOUTS[name])
    # The last pipeline stage compared every micro-batch it processed.
    assert sum(r["checked_micro_batches"] for r in results) >= 1


def test_tied_embeddings_pp2():
    run_distributed(check_layout, 2, dict(pipeline_model_parallel_size=2),
                    model_overrides=dict(untie_embeddings_and_output_weights=False))
