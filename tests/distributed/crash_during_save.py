"""Run as a script: save iteration 1, then die by SIGKILL in the middle of saving iteration 2
(or of saving iteration 1 again, with ``resave``) when ``os.replace`` targets the name
``kill_at``. Used by test_checkpoint_crash.py; arguments: the save directory, ``kill_at``,
optionally ``resave``."""

import os
import signal
import sys
from pathlib import Path

import megatron_solopo  # noqa: F401


def main(root: str, kill_at: str, resave: bool = False) -> None:
    import torch

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.parallel.distributed import DistributedEnv, initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt
    from tests.distributed.common import tiny_model
    from tests.harness import free_port

    model = tiny_model()
    parallel = ParallelConfig()
    initialize_distributed(parallel, DistributedEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    (chunk,) = build_model(model, build_transformer_config(model, parallel))
    run_config = {"padded_vocab_size": model.padded_vocab_size(1)}
    ckpt.save_checkpoint(root, 1, [chunk], run_config, common={"iteration": 1})
    with torch.no_grad():
        for param in chunk.parameters():
            param.add_(1.0)  # iteration 2's weights differ from iteration 1's
    real_replace = os.replace

    def dying_replace(source, target):
        if Path(target).name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(source, target)

    ckpt.os.replace = dying_replace
    iteration = 1 if resave else 2
    ckpt.save_checkpoint(root, iteration, [chunk], run_config, common={"iteration": iteration})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], resave=sys.argv[3:] == ["resave"])
