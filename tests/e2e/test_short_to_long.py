"""The short-to-long experiment at smoke-test sizes (one seed, a few steps): every stage runs for
real (tokenizer, model, conversion, SFT with the Trainer, self-made pairs through the generation
backend, five alignment runs, evaluation by length), and the outputs hold what the docs promise.
A second start resumes without redoing anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
METHODS = ("dpo_short", "long_dpo", "solopo_dpo", "solopo_orpo", "longpo")


def _run(out, *extra):
    result = subprocess.run(
        [sys.executable, "experiments/short_to_long/run.py", "--out", str(out), "--tiny",
         "--seeds", "1", *extra], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def test_experiment_smoke(tmp_path):
    out = tmp_path / "s2l"
    _run(out)
    results = json.loads((out / "results.json").read_text())
    lengths = {"1x", "2x"}  # the --tiny preset's lengths

    sft = results["sft"]
    assert set(sft["eval"]["by_length"]["all"]) == lengths
    losses = sft["train"]["losses"]
    assert len(losses) == sft["train"]["steps"] == 6 and losses[-1] < losses[0], losses

    runs = {run["method"]: run for run in results["runs"]}
    assert set(runs) == set(METHODS) and len(results["runs"]) == len(METHODS)
    for method, run in runs.items():
        by_length = run["eval"]["by_length"]
        assert set(by_length) == {"all", "kv_retrieval", "needle"}
        for task, cells in by_length.items():
            assert set(cells) == lengths, (method, task)
            for cell in cells.values():
                assert 0.0 <= cell["sub_em"] <= 1.0 and 0.0 <= cell["f1"] <= 1.0
                assert cell["n"] == (6 if task == "all" else 3)
        train = run["train"]
        assert train["steps"] == 3 and train["tokens"] > 0 and train["step_time_s"] > 0
        assert all(isinstance(loss, float) for loss in train["losses"])
        assert run["pairs"]["pairs"] > 0
    # cost: Long-DPO's steps see two long sequences per pair, SoLoPO's one long and two short
    tokens = {method: runs[method]["train"]["tokens"] for method in METHODS}
    assert tokens["long_dpo"] > tokens["solopo_dpo"] > tokens["dpo_short"]
    # reference passes only where the objective needs one
    assert runs["solopo_orpo"]["train"]["reference_s"] < 0.01
    assert (out / "runs" / "solopo_dpo-seed0" / "reference.npz").exists()
    assert not (out / "runs" / "solopo_orpo-seed0" / "reference.npz").exists()

    aggregate = results["aggregate"]
    assert set(aggregate) == set(METHODS)
    assert all(aggregate[m]["seeds"] == [0] for m in METHODS)
    table = (out / "results.md").read_text()
    assert all(f"| {method} | 1 |" in table for method in METHODS)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        for name in ("accuracy_vs_length.png", "accuracy_vs_wallclock.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # resumes: nothing is trained or generated again
    before = {path: path.stat().st_mtime for path in (out / "runs").glob("*/worker.json")}
    log = _run(out)
    assert "SFT: loss" in log
    assert {path: path.stat().st_mtime for path in (out / "runs").glob("*/worker.json")} == before
