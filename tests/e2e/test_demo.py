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
    assert " iteration       30/      30 |" in result.stdout  # Megatron's log line
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["iterations"] == 30
    assert summary["final_loss"] < summary["first_loss"] - 0.1
    assert summary["final_train_accuracy"] > 0.5
    assert summary["eval"]["eval/short/rewards/accuracies"] > 0.5
    assert (workdir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
