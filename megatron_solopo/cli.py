"""What the command-line entry points share: one ``error: ...`` line per failure, not one per rank.

Under ``torchrun`` every rank usually meets the same user error (a bad path, a stale cache).
Global rank 0 prints it and exits at once; the other ranks wait a few seconds before printing, so
that when the launcher stops them after rank 0's exit they stay silent, while an error only one
of them met is still printed (late) by that rank.
"""

from __future__ import annotations

import os
import signal
import sys
import time

# Long enough for torchrun to notice rank 0's exit and stop the others (it polls every ~0.1 s).
OTHER_RANKS_DELAY_S = 10.0


def global_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report_error(message: str) -> None:
    """Print ``error: <message>`` to stderr once per job (see the module docstring)."""
    if global_rank() != 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # The launcher's SIGTERM must end this wait, not be recorded by a graceful-stop handler.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        time.sleep(OTHER_RANKS_DELAY_S)
    print(f"error: {message}", file=sys.stderr, flush=True)


def exit_process(code: int) -> None:
    """The end of a command-line entry point (``sys.exit(code)``). A failed rank of a multi-rank
    job skips the interpreter's teardown (seconds with megatron and torch loaded) so that the
    launcher stops the other ranks before they print the same error; everything was flushed and
    the process group destroyed before."""
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
