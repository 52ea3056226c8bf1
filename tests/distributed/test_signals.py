"""Never lose or poison a checkpoint: SIGTERM to a 2-rank torchrun run mid-training saves the
iteration in flight and the same command resumes it; training.exit_duration_minutes does the same;
weights that went NaN are never saved, and megatron-to-hf refuses a checkpoint that holds some."""

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.distributed.trainer_common import (base_config, logging_result, make_dataset,
                                              prepare_starting_point, train)
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    paths = make_dataset(root / "data", num_records=16, long_length=60)
    paths["init"] = str(root / "init")
    raw = base_config(paths, str(root))
    run_distributed(prepare_starting_point, 1, raw, paths["init"])
    return paths, root


def tracker(save: Path) -> str:
    return (save / "latest_checkpointed_iteration.txt").read_text().strip()


def test_sigterm_saves_the_step_in_flight_and_the_run_resumes(setup, tmp_path):
    from megatron_solopo.parallel.distributed import free_port

    paths, root = setup
    save = tmp_path / "run"
    raw = base_config(paths, str(root), training={"train_iters": 500},
                      checkpoint={"save": str(save)})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), "-m", "megatron_solopo.train", "--config",
             str(config)], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        deadline = time.time() + 600
        while " iteration        2/" not in log.read_text():
            assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)  # as scancel / Slurm's --signal would
        launcher.wait(timeout=300)
    text = log.read_text()
    stops = re.findall(r"\[megatron-solopo\] received SIGTERM: stopped after iteration (\d+), "
                       r"saved iteration (\d+) in (\S+); the same command resumes it", text)
    assert len(stops) == 1, text[-3000:]  # one line, not one per rank
    stopped, saved, directory = stops[0]
    logged = [int(n) for n in re.findall(r"^ iteration +(\d+)/ +500 \|", text, re.MULTILINE)]
    assert stopped == saved and int(saved) == max(logged) >= 2 and int(saved) < 500
    assert directory.rstrip(";") == str(save) and tracker(save) == saved
    assert "Traceback" not in text.split("Received 15 death signal")[0]  # no worker traceback
    assert not [line for line in text.splitlines() if "megatron_solopo/" in line and "File" in line]

    # The same command resumes at the saved iteration (fewer steps to keep the test short).
    resumed = copy.deepcopy(raw)
    resumed["training"]["train_iters"] = int(saved) + 2
    result = logging_result(run_distributed(train, 2, resumed, capture=True))
    assert [row["iteration"] for row in result["history"]] == [int(saved) + 1, int(saved) + 2]
    assert tracker(save) == str(int(saved) + 2)


def test_exit_duration_saves_and_stops(setup, tmp_path):
    paths, root = setup
    save = tmp_path / "run"
    raw = base_config(paths, str(root), training={"train_iters": 50, "exit_duration_minutes": 1e-6},
                      checkpoint={"save": str(save)})
    results = run_distributed(train, 2, raw, capture=True)
    assert [row["iteration"] for row in logging_result(results)["history"]] == [1]
    assert tracker(save) == "1"
    output = "".join(result["output"] for result in results)
    assert output.count("training.exit_duration_minutes=1e-06 reached") == 1
    assert "saved iteration 1 in" in output


def poison_weights(trainer) -> None:
    """NaN in one weight: every later step is skipped, and a save would write NaN."""
    import torch

    with torch.no_grad():
        next(trainer.model[0].parameters()).view(-1)[0] = float("nan")


def stopped_message(raw: dict) -> str:
    from megatron_solopo.training.trainer import TrainingStopped

    try:
        train(raw, capture=True, patch=poison_weights)
    except TrainingStopped as err:
        return str(err)
    return ""


def test_non_finite_weights_are_never_saved(setup, tmp_path):
    paths, root = setup
    save = tmp_path / "run"
    raw = base_config(paths, str(root), training={"train_iters": 3,
                                                  "max_consecutive_skipped_steps": 10},
                      checkpoint={"save": str(save), "save_interval": 1})
    messages = run_distributed(stopped_message, 2, raw)
    assert messages[0] == messages[1]
    assert messages[0] == (f"not saving iteration 1 to {save}: the model weights hold NaN/Inf "
                           f"values; this run saved no checkpoint; it started from {paths['init']}")
    assert not save.exists()  # no checkpoint, no temporary directory, no empty directory

    raw["training"]["max_consecutive_skipped_steps"] = 2
    raw["checkpoint"]["save_interval"] = 0
    (message, _) = run_distributed(stopped_message, 2, raw)
    assert message.startswith("2 consecutive steps had a NaN/Inf loss or gradient (iteration 2); "
                              "stopping without saving")
    assert message.endswith(f"this run saved no checkpoint; it started from {paths['init']}")
    assert not save.exists()


def write_poisoned_checkpoint(raw: dict, output: str) -> None:
    """Rank function: a checkpoint with a NaN weight, written past the save-side check (as an
    older version, or another tool, could have written it)."""
    import torch

    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training import checkpoint as ckpt
    from megatron_solopo.training.model_setup import write_initial_checkpoint

    real_save = ckpt.save_checkpoint

    def poisoned(root, iteration, chunks, run_config, **kwargs):
        with torch.no_grad():
            chunks[0].decoder.layers[0].mlp.linear_fc2.weight.view(-1)[3] = float("inf")
        assert not ckpt.weights_are_finite(chunks)
        check, ckpt.state_is_finite = ckpt.state_is_finite, lambda state: True
        try:
            return real_save(root, iteration, chunks, run_config, **kwargs)
        finally:
            ckpt.state_is_finite = check

    ckpt.save_checkpoint = poisoned
    try:
        write_initial_checkpoint(config_from_dict(raw), output)
    finally:
        ckpt.save_checkpoint = real_save


def test_megatron_to_hf_refuses_non_finite_weights(setup, tmp_path, capsys):
    from tools.convert_checkpoint import main

    paths, root = setup
    raw = base_config(paths, str(root))
    run_distributed(write_poisoned_checkpoint, 1, raw, str(tmp_path / "poisoned"))
    output = tmp_path / "hf"
    assert main(["megatron-to-hf", "--megatron-dir", str(tmp_path / "poisoned"),
                 "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: .*release: weight 'decoder\.layers\.mlp\.linear_fc2\.weight' holds "
                     r"1 NaN/Inf value\(s\) of \d+; refusing to export a diverged checkpoint", err), err
    assert not output.exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_a_user_error_is_printed_once_under_torchrun(setup, tmp_path):
    """Both ranks meet the same set-up error: one `error:` line, exit code 2 in torchrun's
    summary, no traceback of ours, no checkpoint.save directory."""
    from megatron_solopo.parallel.distributed import free_port

    paths, root = setup
    raw = base_config(paths, str(root), checkpoint={"save": str(tmp_path / "run")},
                      data={"max_tokens_per_micro_batch": 10})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(free_port()), "-m", "megatron_solopo.train", "--config", str(config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stdout[-3000:]
    assert "more than data.max_tokens_per_micro_batch=10" in errors[0]
    assert "exitcode: 2" in result.stdout
    assert not [line for line in result.stdout.splitlines()
                if "megatron_solopo/" in line and "File" in line]
    assert not (tmp_path / "run").exists()
