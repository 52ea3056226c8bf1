"""The one wrapper that undoes Megatron-Core's loss scaling (training/loss.py). The distributed
parity tests (CP=1 vs 2 vs 4, DP=1 vs 2, M=1 vs 4) pin the same contract end to end."""

import torch

from megatron_solopo.training.loss import undo_megatron_loss_scaling


def test_undo_cancels_schedule_scale_and_ddp_average():
    loss = torch.tensor(0.25)
    for num_microbatches, dp, cp in [(1, 1, 1), (4, 2, 1), (3, 2, 4), (8, 1, 2)]:
        handed = undo_megatron_loss_scaling(loss, num_microbatches=num_microbatches,
                                            data_parallel_size=dp, context_parallel_size=cp)
        # Megatron then multiplies by cp / M (schedule) and by 1 / (dp * cp) (DDP pre-scale
        # before summing over the DP x CP group): every rank's contribution must come out as is.
        effective = handed * cp / num_microbatches / (dp * cp)
        assert torch.isclose(effective, loss)
