"""A job killed while saving leaves the previous checkpoint as the latest, loadable."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_solopo.training import checkpoint as ckpt
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


def _load_and_gather(root):
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.model.state import gather_full_state_dict
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from tests.distributed.common import tiny_model

    model = tiny_model()
    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=999)
    (chunk,) = build_model(model, build_transformer_config(model, parallel))
    loaded = ckpt.load_checkpoint(root, [chunk], padded_vocab_size=model.padded_vocab_size(1))
    return loaded.iteration, loaded.common["iteration"], gather_full_state_dict([chunk])


def _run_and_kill(tmp_path, root, *args):
    log = tmp_path / "crash.log"
    # Output to a file, not a pipe: dist_checkpointing's helper process outlives the kill and
    # would keep a pipe open.
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "tests.distributed.crash_during_save",
                                    str(root), *args], cwd=REPO, stdout=handle, stderr=handle,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"),
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=300)
        finally:  # the killed job's helper processes would otherwise linger
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == -9, log.read_text()[-3000:]


@pytest.mark.parametrize("kill_at", ["iter_0000002", ckpt.TRACKER_FILE])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, kill_at):
    root = tmp_path / "ckpt"
    _run_and_kill(tmp_path, root, kill_at)
    assert (root / ckpt.TRACKER_FILE).read_text().strip() == "1"
    # Killed before the rename: the shards sit in a hidden temporary directory. Killed while
    # replacing the tracker: iteration 2 is complete on disk but not yet the latest.
    leftovers = sorted(p.name for p in root.iterdir())
    assert ("iter_0000002" in leftovers) == (kill_at == ckpt.TRACKER_FILE)
    (iteration, common_iteration, weights), = run_distributed(_load_and_gather, 1, str(root))
    assert iteration == 1 and common_iteration == 1
    # Iteration 1 holds the freshly initialized weights, iteration 2 those + 1: check we got 1.
    (_, _, first), = run_distributed(_load_and_gather, 1, str(root / "iter_0000001"))
    assert all(torch.equal(weights[key], first[key]) for key in weights)
    if kill_at == ckpt.TRACKER_FILE:
        (_, _, second), = run_distributed(_load_and_gather, 1, str(root / "iter_0000002"))
        assert not all(torch.equal(weights[key], second[key]) for key in weights)


def test_sigkill_while_resaving_same_iteration_keeps_the_old_copy(tmp_path):
    """Saving iteration 1 again (a run resumed at its last iteration), killed after the old copy
    was moved aside and before the new one was renamed into place: the old copy still loads."""
    root = tmp_path / "ckpt"
    _run_and_kill(tmp_path, root, "iter_0000001", "resave")
    assert (root / ckpt.TRACKER_FILE).read_text().strip() == "1"
    assert not (root / "iter_0000001").exists() and (root / ".old-iter_0000001").exists()
    (iteration, common_iteration, weights), = run_distributed(_load_and_gather, 1, str(root))
    assert iteration == 1 and common_iteration == 1
    # The old copy holds the initialized weights; the killed save had them + 1.
    (_, _, old), = run_distributed(_load_and_gather, 1, str(root / ".old-iter_0000001"))
    assert all(torch.equal(weights[key], old[key]) for key in weights)
