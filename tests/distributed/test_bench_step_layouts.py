"""benchmarks/bench_step.py's measurement on 2 gloo ranks (TP=2, CP=2, PP=2), in process: every rank
reports, and the summary counts one data-parallel rank's tokens and the largest rank's memory."""

import sys
from pathlib import Path

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")


def _measure(raw: dict) -> dict:
    """Rank function: one step of ``raw`` through the benchmark's worker."""
    sys.path.insert(0, BENCH)
    import step_worker

    return step_worker.run({"raw": raw, "mode": "steps", "steps": 1, "warmup": 0})


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--cp", "2"], ["--pp", "2"]],
                         ids=["tp2", "cp2", "pp2"])
def test_two_rank_layouts(tmp_path, layout):
    sys.path.insert(0, BENCH)
    import bench_step

    args = bench_step.parse_args(["--long-length", "128", "--short-length", "32",
                                  "--response-length", "8", "--nproc", "2", *layout])
    raw = bench_step._config_for(args, str(tmp_path), "solopo", 128, None)
    results = run_distributed(_measure, 2, raw)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["dp_rank"] for r in results} == {0}  # TP, CP or PP: one data-parallel rank
    row = bench_step.summarize(results, 2)
    assert row["tokens_per_step"] == 2 * 32 + 128  # one group, counted once
    assert row["peak_memory_gib"] == max(r["peak_memory_gib"] for r in results) > 0
    assert row["step_time_s"] == max(r["step_times_s"][0] for r in results)
    assert row["tflops_per_gpu"] == pytest.approx(results[0]["flops"] / row["step_time_s"] / 2 / 1e12)
