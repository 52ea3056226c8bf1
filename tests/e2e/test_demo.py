"""`make demo` as a test: the SoLoPO loss goes down and reward accuracy on the training pairs
ends above chance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_demo_learns(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "megatron_solopo.demo", "--workdir", str(workdir)],
                            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "[demo] summary" in result.stdout
    ending = result.stdout[result.stdout.index("[demo] what next"):]
    assert (f"python tools/convert_checkpoint.py megatron-to-hf --megatron-dir "
            f"{workdir.resolve() / 'checkpoints'} --output") in ending
    assert " iteration       30/      30 |" in result.stdout  # Megatron's log line
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["iterations"] == 30
    assert summary["final_loss"] < summary["first_loss"] - 0.1
    assert summary["final_train_accuracy"] > 0.5
    assert summary["eval"]["eval/short/rewards/accuracies"] > 0.5
    assert (workdir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"


@pytest.mark.parametrize("args", [[], ["--train-iters", "2"]])
def test_demo_refuses_a_foreign_directory_and_too_few_steps(tmp_path, args):
    """Nothing is deleted: a non-empty --workdir that no demo made is refused (exit 2)."""
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("precious")
    if args:  # an empty directory, but too few steps
        (workdir / "notes.txt").unlink()
    result = subprocess.run([sys.executable, "-m", "megatron_solopo.demo", "--workdir",
                             str(workdir), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:]
    if args:
        assert "--train-iters 2: at least 5" in result.stdout
    else:
        assert "is not empty and is not a previous demo's directory" in result.stdout
        assert (workdir / "notes.txt").read_text() == "precious"
