"""One training run of the experiment: ``train_run(RUN_DIR)`` (run.py calls it in its own
process, which saves a fresh interpreter's start-up per run; ``run.py --isolate`` runs
``python experiments/short_to_long/worker.py RUN_DIR`` instead). It

reads ``RUN_DIR/config.yaml`` (a regular run config), precomputes the reference log-probs when
the objective needs them (``training.precompute``), trains with the project's ``Trainer`` and
converts the final checkpoint to Hugging Face (``RUN_DIR/hf``) for generation. Writes
``RUN_DIR/worker.json``: wall times (reference pass, set-up, training steps), tokens processed,
FLOPs, the loss curve and skipped steps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def train_run(run_dir: str) -> dict:
    from megatron_solopo.config import load_config, reference_mode
    from megatron_solopo.parallel.distributed import destroy_distributed
    from megatron_solopo.training.trainer import Trainer

    run = Path(run_dir)
    config = load_config(str(run / "config.yaml"), ())
    report: dict = {}
    started = time.perf_counter()
    if reference_mode(config) == "precomputed":
        from megatron_solopo.training.precompute import precompute_reference

        try:
            precompute_reference(config, config.reference.cache)
        finally:
            destroy_distributed()
    report["reference_s"] = time.perf_counter() - started

    steps: list = []

    class RecordingTrainer(Trainer):
        """The trainer as is; every step's tokens, FLOPs and time are kept for the report."""

        def _log(self, result, first_step):
            steps.append({"tokens": result.num_tokens, "flops": result.flops,
                          "elapsed": result.elapsed, "skipped": result.skipped,
                          "loss": result.metrics.get("loss")})
            super()._log(result, first_step)

    trainer = RecordingTrainer(config)
    try:
        setup_start = time.perf_counter()
        trainer.setup()
        report["setup_s"] = time.perf_counter() - setup_start
        train_start = time.perf_counter()
        summary = trainer.train()
        report["train_loop_s"] = time.perf_counter() - train_start
        report["metrics"] = summary["history"]
    finally:
        trainer.close()
    report["steps"] = len(steps)
    report["step_time_s"] = sum(step["elapsed"] for step in steps)
    report["tokens"] = sum(step["tokens"] for step in steps)
    report["flops"] = sum(step["flops"] for step in steps)
    report["skipped_steps"] = sum(int(step["skipped"]) for step in steps)
    report["losses"] = [step["loss"] for step in steps]

    from megatron_solopo.convert import megatron_to_hf

    convert_start = time.perf_counter()
    if (run / "hf").exists():
        import shutil

        shutil.rmtree(run / "hf")
    megatron_to_hf(config.checkpoint.save, run / "hf", max_shard_size="1GB")
    report["convert_s"] = time.perf_counter() - convert_start
    tmp = run / f"worker.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, run / "worker.json")
    return report


if __name__ == "__main__":
    train_run(sys.argv[1])
