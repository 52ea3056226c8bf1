"""benchmarks/bench_step.py keeps working: flag checks, the max-length search, one real step of
every objective (tokens and model FLOPs checked against the formula), the in-process (GPU) search
recovering from an out-of-memory, and the command line end to end (steps and a CPU memory budget;
2 ranks with TP=2 under --run-slow). tests/distributed/test_bench_step_layouts.py measures on 2
ranks in process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_step  # noqa: E402
import step_worker  # noqa: E402

LONG, SHORT, RESPONSE = 96, 32, 8


def _args(*extra):
    return bench_step.parse_args(["--long-length", str(LONG), "--short-length", str(SHORT),
                                  "--response-length", str(RESPONSE), *extra])


# ----------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------
def test_search_doubles_then_refines_with_increasing_probes_only():
    seen = []

    def probe(length):
        seen.append(length)
        return length <= 1000

    found = bench_step.search_max_length(probe, start=128, cap=4096, granularity=64,
                                         deadline=time.monotonic() + 60)
    assert found == {"max_length": 960, "first_failure": 1024, "time_capped": False}
    assert seen[:4] == [128, 256, 512, 1024]
    assert seen[4:] == list(range(576, 1024, 64))  # steps of 512 / 8 up to the failure


def test_search_stops_at_the_cap_and_at_the_deadline():
    found = bench_step.search_max_length(lambda n: True, start=100, cap=1000, granularity=64,
                                         deadline=time.monotonic() + 60)
    assert found["max_length"] == 960 and found["first_failure"] is None  # 64 * 15 <= 1000
    calls = []
    found = bench_step.search_max_length(lambda n: calls.append(n) or True, start=128, cap=4096,
                                         granularity=64, deadline=time.monotonic() - 1)
    assert found == {"max_length": None, "first_failure": None, "time_capped": True}
    assert calls == []
    found = bench_step.search_max_length(lambda n: False, start=128, cap=4096, granularity=64,
                                         deadline=time.monotonic() + 60)
    assert found == {"max_length": None, "first_failure": 128, "time_capped": False}


@pytest.mark.parametrize("argv, message", [
    (["--objectives", "solopo,dpx"], "--objectives: unknown dpx"),
    (["--long-length", "100", "--short-length", "200"], "--short-length (200) <= --long-length"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--find-max-length"], "needs --memory-budget-gib"),
    (["--skip-steps"], "measures nothing"),
    (["--attention-backend", "bogus", "--objectives", "long_dpo"], "attention_backend"),
    (["--nproc", "3", "--tp", "3", "--objectives", "long_dpo"], "3"),
])
def test_bad_flags_exit_2_with_one_error_line(argv, message, capsys):
    assert bench_step.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1
    assert message in err


def test_shared_prefix_flag_sets_the_config_field():
    import dataclasses

    from megatron_solopo.config import DataConfig

    assert "shared_prefix" in {f.name for f in dataclasses.fields(DataConfig)}
    args = _args("--shared-prefix", "both")
    assert bench_step.shared_prefix_variants(args) == [False, True]
    raw = bench_step.run_config(args, "solopo", LONG, 1, "x", True)
    assert raw["data"]["shared_prefix"] is True
    # Without the flag the field is never set, whatever the version.
    assert "shared_prefix" not in bench_step.run_config(_args(), "solopo", LONG, 1, "x", None)["data"]


def test_report_ratios_and_table():
    rows = {"solopo": {"step_time_s": 1.0, "peak_memory_gib": 2.0, "shared_prefix": None},
            "long_dpo": {"step_time_s": 2.0, "peak_memory_gib": 4.0, "shared_prefix": None},
            "longpo": {"error": "out of memory", "shared_prefix": None}}
    bench_step.add_ratios(rows, [None])
    assert rows["solopo"]["ratio_to_long_dpo"] == 0.5
    assert rows["solopo"]["memory_ratio_to_long_dpo"] == 0.5
    assert rows["long_dpo"]["ratio_to_long_dpo"] == 1.0
    assert rows["longpo"]["ratio_to_long_dpo"] is None
    without = {"solopo": {"step_time_s": 1.0, "peak_memory_gib": 2.0, "shared_prefix": None}}
    bench_step.add_ratios(without, [None])
    assert without["solopo"]["ratio_to_long_dpo"] is None


# ----------------------------------------------------------------------------------------------
# In process: one step of every objective, and the in-process search
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def single_process(monkeypatch):
    from megatron_solopo.parallel.distributed import destroy_distributed, free_port

    for name in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # not the default 29500: may be taken
    yield
    destroy_distributed()


# Real (unpadded here: lengths are even) tokens each objective packs per group.
TOKENS = {"solopo": 2 * SHORT + LONG, "solopo_both": 2 * SHORT + 2 * LONG,
          "solopo_orpo": 2 * SHORT + LONG, "long_dpo": 2 * LONG, "long_orpo": 2 * LONG,
          "longpo": 2 * LONG}


def _expected_flops(fields: dict, objective: str) -> float:
    """The docstring's formula written out independently for one group."""
    h, f, layers = fields["hidden_size"], fields["ffn_hidden_size"], fields["num_layers"]
    heads, groups, vocab = fields["num_attention_heads"], fields["num_query_groups"], fields["vocab_size"]
    d_q, d_kv = h, h // heads * groups
    n_dense = layers * (h * (d_q + 2 * d_kv) + d_q * h + 3 * h * f)
    lengths = {"solopo": [SHORT, SHORT, LONG], "solopo_both": [SHORT, SHORT, LONG, LONG],
               "solopo_orpo": [SHORT, SHORT, LONG]}.get(objective, [LONG, LONG])
    # Log-prob positions: responses; LongPO also every target of long/chosen (L - 1 of them).
    positions = RESPONSE * len(lengths) + (LONG - 1 - RESPONSE if objective == "longpo" else 0)
    padded_vocab = -(-vocab // 128) * 128
    forward = (2 * n_dense * sum(lengths) + layers * sum(2 * n * n * d_q for n in lengths)
               + 2 * h * padded_vocab * positions)
    return 3.0 * forward


def test_one_step_of_every_objective(tmp_path, single_process):
    args = _args()
    fields = bench_step.model_fields(args)
    for objective in bench_step.OBJECTIVES:
        flops = {}
        for shared in (False, True):
            raw = bench_step._config_for(args, str(tmp_path / str(shared)), objective, LONG, shared)
            result = step_worker.run({"raw": raw, "mode": "steps", "steps": 1, "warmup": 0})
            assert "error" not in result, (objective, result)
            assert len(result["step_times_s"]) == 1 and result["step_times_s"][0] > 0
            assert result["num_tokens"] == TOKENS[objective], objective  # logical tokens
            assert math.isfinite(result["losses"][0]) and result["skipped_steps"] == 0
            assert result["peak_memory_gib"] > 0 and result["device"] == "cpu"
            assert bench_step.planner_gib(raw, 1) > 0
            flops[shared] = result["flops"]
        assert math.isclose(flops[False], _expected_flops(fields, objective), rel_tol=1e-9), objective
        # Sharing computes each pair's common prefix once: fewer FLOPs, never more.
        assert flops[True] < flops[False], objective


def test_several_lengths_in_one_process(tmp_path, single_process):
    """The GPU path of a comma-separated --long-length: one trainer, one dataset per length."""
    from step_worker import token_budget

    args = _args("--long-length", "64,96")
    raws = [bench_step._config_for(args, str(tmp_path), "long_dpo", n, None) for n in (64, 96)]
    lengths = [{"long_length": n, "prefix": raw["data"]["train_prefix"],
                "token_budget": token_budget(raw["data"]["train_prefix"], raw)}
               for n, raw in zip((64, 96), raws)]
    result = step_worker.run({"raw": raws[0], "mode": "steps", "steps": 1, "warmup": 0,
                              "lengths": lengths})
    rows = result["by_length"]
    assert [row["long_length"] for row in rows] == [64, 96]
    assert [row["num_tokens"] for row in rows] == [2 * 64, 2 * 96]
    assert rows[1]["flops"] > rows[0]["flops"] > 0
    assert all(row["peak_memory_gib"] > 0 and row["dp_rank"] == 0 for row in rows)


def test_in_process_search_recovers_from_out_of_memory(tmp_path, single_process, monkeypatch):
    """The GPU search path, run on CPU: a step that runs out of memory (raised after the real
    forward/backward, gradients accumulated) is caught, memory freed, and the next, shorter probe
    trains normally."""
    import torch

    from megatron_solopo.training import trainer as trainer_module

    real = trainer_module.forward_backward
    lengths = []

    def forward_backward(model, micro_batches, *args, **kwargs):
        outputs = real(model, micro_batches, *args, **kwargs)
        longest = max(int(b.seq_lengths.max()) for b in micro_batches)
        lengths.append(longest)
        if longest >= 256:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return outputs

    monkeypatch.setattr(trainer_module, "forward_backward", forward_backward)
    args = _args()
    raw = bench_step._config_for(args, str(tmp_path), "long_dpo", 64, None)
    spec = {"raw": raw, "mode": "search", "workdir": str(tmp_path), "short_length": SHORT,
            "response_length": RESPONSE, "num_records": 2,
            "vocab_size": bench_step.model_fields(args)["vocab_size"],
            "search": {"budget_gib": 1000.0, "start": 64, "cap": 512, "granularity": 64,
                       "max_seconds": 300}}
    found = step_worker.run(spec)["search"]
    assert found["max_length"] == 192 and found["first_failure"] == 256
    probes = {p["long_length"]: p for p in found["probes"]}
    assert sorted(probes) == [64, 128, 192, 256]
    assert probes[256]["error"] == "out of memory" and not probes[256]["fits"]
    assert probes[192]["fits"] and probes[192]["peak_memory_gib"] > 0
    assert lengths[-1] == 192  # trained after the out-of-memory


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def _cli(*argv, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(BENCH / "bench_step.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_steps_and_max_length_against_a_cpu_budget(tmp_path):
    out = tmp_path / "out.json"
    # A budget below any real step: the first probe is measured and refused.
    proc = _cli("--objectives", "long_dpo", "--find-max-length", "--memory-budget-gib", "0.0001",
                "--long-length", "64", "--short-length", "32", "--response-length", "8",
                "--steps", "1", "--warmup", "0", "--search-cap", "256", "--search-granularity",
                "64", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    row = report["objectives"]["long_dpo"]
    for key in ("step_time_s", "tokens_per_s", "peak_memory_gib", "tflops_per_gpu",
                "planner_estimate_gib"):
        assert row[key] > 0, key
    assert row["ratio_to_long_dpo"] == 1.0 and row["tokens_per_step"] == 2 * 64
    assert math.isclose(row["tokens_per_s"], row["tokens_per_step"] / row["step_time_s"])
    found = report["max_length"]["long_dpo"]
    assert found["max_length"] is None and found["first_failure"] == 64
    (probe,) = found["probes"]
    assert probe["peak_memory_gib"] > 0.0001 and not probe["fits"]
    assert probe["planner_estimate_gib"] > 0
    assert found["planner_max_length"] is None  # the planner agrees nothing fits 0.1 MiB
    assert "time/long_dpo" in proc.stdout and "max long length" in proc.stdout


@pytest.mark.slow
def test_cli_two_ranks_tensor_parallel_json(tmp_path):
    out = tmp_path / "out.json"
    proc = _cli("--objectives", "solopo,long_dpo", "--long-length", "128", "--short-length", "32",
                "--response-length", "8", "--steps", "1", "--warmup", "0", "--nproc", "2",
                "--tp", "2", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["objectives"]
    for name in ("solopo", "long_dpo"):
        for key in ("step_time_s", "tokens_per_s", "peak_memory_gib", "ratio_to_long_dpo",
                    "tflops_per_gpu", "planner_estimate_gib"):
            assert rows[name][key] is not None and rows[name][key] > 0, (name, key)
    assert rows["long_dpo"]["ratio_to_long_dpo"] == 1.0
    assert math.isclose(rows["solopo"]["ratio_to_long_dpo"],
                        rows["solopo"]["step_time_s"] / rows["long_dpo"]["step_time_s"])
    # TP ranks share the data: the tokens of one group, not two.
    assert rows["long_dpo"]["tokens_per_step"] == 2 * 128
    assert report["config"]["tp"] == 2 and report["config"]["nproc"] == 2
