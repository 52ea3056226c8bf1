"""Graceful stop: SIGTERM/SIGINT (Slurm preemption, ``scancel``, Ctrl-C) or a wall-clock limit.

Megatron's ``--exit-signal-handler`` behaviour: the handler only records the signal; the trainer
finishes the step in flight, then all ranks agree with one all-reduce at the end of every step
(a rank that got the signal, or whose clock passed ``training.exit_duration_minutes``, says so),
save, print one line and exit 0. A second signal of the same kind acts as if no handler were
installed (a second Ctrl-C stops at once).

Under ``torchrun`` the launcher receives the signal and forwards SIGTERM to every worker, then
waits ``--shutdown-timeout`` seconds (default 30) before SIGKILL: raise it for large models,
whose save takes longer.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitSignalHandler:
    """Records SIGTERM/SIGINT instead of dying; ``release()`` restores the previous handlers."""

    def __init__(self, signals=SIGNALS):
        self.received: Optional[int] = None  # the first signal
        self._seen: set = set()
        self._previous: dict = {}
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test's worker thread)
                pass

    def _handle(self, signum, frame) -> None:
        # The same kind twice: behave as without the handler. Not any two: Ctrl-C under torchrun
        # delivers SIGINT from the terminal and SIGTERM from the launcher, once each.
        if signum in self._seen:
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.release()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self._seen.add(signum)
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def release(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def agree_to_stop(local_stop: bool) -> bool:
    """True on every rank when any rank asks to stop: one scalar all-reduce (MAX) over the world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_stop
    flag = torch.tensor([1.0 if local_stop else 0.0])
    if torch.cuda.is_available():
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class StopConditions:
    """What the trainer asks after each step: a recorded signal or the wall-clock limit."""

    def __init__(self, exit_duration_minutes: Optional[float], start_time: Optional[float] = None):
        self.exit_duration_minutes = exit_duration_minutes
        self.start_time = time.time() if start_time is None else start_time
        self.handler = ExitSignalHandler()

    def local_reason(self) -> Optional[str]:
        if self.handler.received is not None:
            return f"received {self.handler.name}"
        if self.exit_duration_minutes is not None:
            minutes = (time.time() - self.start_time) / 60
            if minutes >= self.exit_duration_minutes:
                return (f"training.exit_duration_minutes={self.exit_duration_minutes:g} reached "
                        f"({minutes:.1f} min)")
        return None

    def should_stop(self) -> bool:
        return agree_to_stop(self.local_reason() is not None)

    def release(self) -> None:
        self.handler.release()
