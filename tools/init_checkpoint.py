#!/usr/bin/env python
"""Write a randomly initialized model (from a run config's model section) as a weights-only
checkpoint, the starting point of a from-scratch run or of the CPU demo.

    python tools/init_checkpoint.py --config run.yaml --output ckpt/init [section.field=value ...]
"""

import argparse
import sys

from megatron_solopo.config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_intermixed_args(argv)
    from megatron_solopo.parallel.distributed import destroy_distributed
    from megatron_solopo.training.model_setup import write_initial_checkpoint

    import torch.distributed as dist

    try:
        config = load_config(args.config, tuple(args.overrides))
        path = write_initial_checkpoint(config, args.output)
        rank = dist.get_rank() if dist.is_initialized() else 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if rank == 0:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
