#!/usr/bin/env python
"""Precompute reference log-probs for a run (any parallel layout).

    torchrun --nproc-per-node 8 tools/precompute_reference.py --config run.yaml [section.field=value ...]

Runs the frozen reference model (reference.checkpoint, default checkpoint.load) over the
training set (and data.valid_prefix) and writes <prefix>.reference-<key>.npz beside each dataset
(the key hashes the reference checkpoint and model overrides, so caches of other reference models
on the same data coexist; roles another objective computed into the file are kept), with the checkpoint's fingerprint: training refuses a cache computed from another checkpoint or dataset.
A cache that is already fresh (same checkpoint fingerprint, dataset, roles and model settings,
every value present) is kept and a line says so, so a requeued job skips the pass; --force
recomputes it. A run that needs no precomputed reference (reference-free objective, or
reference.mode=live) prints so and exits 0.
"""

import argparse

from megatron_solopo.config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--output", default=None,
                        help="cache path for the training set (default <train_prefix>.reference-<key>.npz; "
                             "training then needs reference.cache=<the same path>)")
    parser.add_argument("--force", action="store_true",
                        help="recompute even a cache that is fresh (by default it is kept)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    # intermixed: overrides may come before or after --output/--force
    args = parser.parse_intermixed_args(argv)
    from megatron_solopo.parallel.distributed import destroy_distributed
    from megatron_solopo.training.precompute import precompute_reference

    try:
        config = load_config(args.config, tuple(args.overrides))
        precompute_reference(config, args.output, force=args.force)
    except ValueError as err:
        from megatron_solopo.cli import report_error

        report_error(str(err))
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    from megatron_solopo.cli import exit_process

    exit_process(main())
