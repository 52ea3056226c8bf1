"""Multi-rank tests on CPU: gloo ranks spawned by the test itself.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes on a free port, creates
the default gloo process group in each, runs ``fn(*args)`` and returns the per-rank results. Any
rank's exception fails the test with that rank's traceback. Model-parallel state and the process
group are destroyed when ``fn`` returns, so each test builds its own layout.

On CPU (gloo), processes come from a forkserver that has already imported torch and
megatron-core, so a test pays ~1 s of start-up instead of a fresh interpreter's ~5 s. With NCCL
they are spawned: a process that has touched CUDA (Transformer Engine's import does) cannot fork
children that use it, so the GPU tier pays the fresh interpreters. ``fn`` must be a module-level
function of an importable module (tests/ is a package for this reason).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import traceback
from typing import Any, Callable

from megatron_solopo.parallel.distributed import free_port

_PRELOAD = ["tests.harness", "megatron_solopo.parallel.distributed", "megatron.core.parallel_state",
            "megatron.core.models.gpt", "megatron.core.distributed",
            "megatron.core.pipeline_parallel"]
_context = None


def _get_context(backend: str = "gloo"):
    global _context
    if backend == "nccl":
        return multiprocessing.get_context("spawn")
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _worker(rank: int, world_size: int, port: int, backend: str, timeout: float, fn: Callable,
            args: tuple, kwargs: dict, results) -> None:
    # A hung collective shows up as every rank's stack on stderr shortly before the timeout.
    faulthandler.dump_traceback_later(max(1.0, timeout - 5), exit=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(1)  # 2 cores, several ranks: avoid oversubscription
        import megatron_solopo  # noqa: F401  (triton stub before any megatron import)
        from megatron_solopo.parallel import cpu_compat

        cpu_compat.install_cpu_shims()
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                             rank=rank, world_size=world_size)
        value = fn(*args, **kwargs)
        # Plain pickle: a queue would pass tensors by shared-memory handles, which die with
        # this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # report everything, including assertion errors
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_solopo.parallel.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600,
                    backend: str = "gloo", **kwargs: Any) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks (gloo on CPU; ``backend="nccl"`` for
    the GPU tier, one GPU per rank); returns results by rank."""
    import queue

    import pytest

    context = _get_context(backend)
    results = context.Queue()
    port = free_port()
    # Not daemonic: ranks may start helper processes (dist_checkpointing does).
    processes = [context.Process(target=_worker, args=(rank, world_size, port, backend, timeout, fn, args, kwargs,
                                                       results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"distributed test timed out after {timeout}s; ranks reported: "
                            f"{sorted(outcomes)}")
            outcomes[rank] = (status, value)
            if status == "error":
                # One failed rank can leave the others blocked in a collective: stop waiting.
                break
    finally:
        for process in processes:
            process.join(timeout=5 if len(outcomes) == world_size else 0.5)
            if process.is_alive():
                process.kill()
    errors = [f"--- rank {rank} ---\n{value}" for rank, (status, value) in sorted(outcomes.items())
              if status == "error"]
    if errors:
        pytest.fail("distributed test failed:\n" + "\n".join(errors), pytrace=False)
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]
