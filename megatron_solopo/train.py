"""Entry point: ``torchrun --nproc-per-node N -m megatron_solopo.train --config run.yaml
[section.field=value ...]`` (or one process per GPU under ``srun``).

``--dry-run`` validates the config and the parallel layout, and prints the parameter count and a
memory estimate per GPU, without starting any process group (``--hf-config`` when the starting
checkpoint is not on this machine).

Exit status: 0 done, or stopped on request after saving (SIGTERM/SIGINT,
``training.exit_duration_minutes``); 1 training diverged (nothing non-finite saved); 2 a user
error, printed once as ``error: ...`` (docs/errors.md).
"""

from __future__ import annotations

import argparse

from megatron_solopo.config import load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m megatron_solopo.train",
        description="SoLoPO / LongPO / DPO training on Megatron-Core. Config: YAML sections plus "
                    "section.field=value overrides (docs/training.md).")
    parser.add_argument("--config", help="YAML run config (examples/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config and layout, print parameters and memory per GPU, exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: the world size to check (default: WORLD_SIZE or "
                             "SLURM_NTASKS or 1)")
    parser.add_argument("--hf-config", default=None,
                        help="with --dry-run: take the model from this Hugging Face config.json "
                             "(or its directory) instead of the starting checkpoint, which need "
                             "not exist yet")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    # intermixed: dotted overrides may come before or after --dry-run/--world-size
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from megatron_solopo.cli import report_error

    args = parse_args(argv)
    if not args.config:
        report_error("--config is required: a YAML run config (e.g. examples/"
                     "solopo_converted_single.yaml), plus section.field=value overrides")
        return 2
    try:
        config = load_config(args.config, tuple(args.overrides))
    except ValueError as err:
        report_error(str(err))
        return 2
    if args.dry_run:
        from megatron_solopo.training.planner import dry_run

        try:
            print(dry_run(config, args.world_size, args.hf_config))
        except ValueError as err:
            report_error(str(err))
            return 2
        return 0
    from megatron_solopo.training.trainer import Trainer, TrainingStopped

    trainer = Trainer(config)
    failure = None
    try:
        trainer.setup()
        summary = trainer.train()
    except ValueError as err:  # a user error (data, checkpoint, cache): say what to change
        failure = (str(err), 2)
    except TrainingStopped as err:  # diverged: nothing non-finite was saved
        failure = (str(err), 1)
    finally:
        trainer.close()
    if failure is not None:  # after close: rank 0 then exits at once (see report_error)
        report_error(failure[0])
        return failure[1]
    trainer.print_summary(summary)
    if summary["stopped"]:
        return 0  # a requested stop (signal, time limit) after a save: resumable, not a failure
    return 0 if summary["iterations"] >= config.training.train_iters else 1


if __name__ == "__main__":
    from megatron_solopo.cli import exit_process

    exit_process(main())
