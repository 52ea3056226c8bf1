"""tools/gpu_check.py's parts that need no GPU: flags, installing missing modules from local
wheels (a real pip install of a wheel built here), phase time caps, and the summary report from a
JSON of phase results; on this machine the check itself stops at the environment phase."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from tools import gpu_check


def _wheel(directory, name: str, module: str, version: str = "1.0") -> str:
    """A minimal pure-Python wheel holding ``module`` (PEP 427 layout)."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{module}/__init__.py": b"VALUE = 42\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    path = os.path.join(directory, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as archive:
        for name_in_zip, data in files.items():
            archive.writestr(name_in_zip, data)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--phases", "tests,gpu"], "--phases: unknown gpu"),
    (["--wheels", "/no/such/dir"], "not a directory"),
    (["--python-version", "3.12"], "go with --download-wheels"),
    (["--budget-seconds", "0"], "must be > 0"),
])
def test_bad_flags_exit_2(argv, message, capsys):
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_defaults_and_wheels_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WHEELS", str(tmp_path))
    args = gpu_check.parse_args([])
    assert args.wheels == str(tmp_path) and args.budget_seconds == 480
    assert args.phase_list == list(gpu_check.PHASES)
    assert gpu_check.parse_args(["--phases", "bench,tests"]).phase_list == ["tests", "bench"]


# ----------------------------------------------------------------------------------------------
# Installing from wheels
# ----------------------------------------------------------------------------------------------
def test_wheel_names_and_commands(tmp_path):
    assert gpu_check.wheel_distribution(
        "megatron_core-0.19.2-cp311-cp311-manylinux_2_28_x86_64.whl") == "megatron-core"
    assert gpu_check.wheel_distribution("/w/PyYAML-6.0.2-cp312-cp312-manylinux.whl") == "pyyaml"
    for name in ("megatron_core-0.19.2-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "PyYAML-6.0.2-cp311-cp311-manylinux_2_17_x86_64.whl", "numpy-2.1.0-cp311.whl",
                 "notes.txt"):
        (tmp_path / name).write_text("")
    chosen, absent = gpu_check.wheels_for(["megatron.core", "yaml", "tqdm"], str(tmp_path))
    assert [os.path.basename(w) for w in chosen] == [
        "PyYAML-6.0.2-cp311-cp311-manylinux_2_17_x86_64.whl",
        "megatron_core-0.19.2-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert absent == ["tqdm"]
    command = gpu_check.install_command("py", chosen, "/t")
    assert command[:3] == ["py", "-m", "pip"] and "--no-index" in command and "--no-deps" in command
    assert command[command.index("--target") + 1] == "/t"
    download = gpu_check.download_command("py", "/d", "3.12", "manylinux_2_28_x86_64")
    assert "--only-binary=:all:" in download and "megatron-core==0.19.2" in download
    assert download[download.index("--python-version") + 1] == "3.12"


def test_missing_modules_are_installed_from_local_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(str(wheels), "gpucheck-probe", "gpucheck_probe")
    modules = {"json": "json", "gpucheck_probe": "gpucheck-probe"}
    env = dict(os.environ)
    assert gpu_check.missing_modules(sys.executable, env, modules) == ["gpucheck_probe"]
    assert gpu_check.missing_modules(sys.executable, env, {"nosuchpkg.sub": "x"}) == ["nosuchpkg.sub"]
    result = gpu_check.ensure_dependencies(sys.executable, env, str(wheels),
                                           str(tmp_path / "site"), modules)
    assert result["missing_before"] == ["gpucheck_probe"]
    assert result["installed"] == ["gpucheck_probe-1.0-py3-none-any.whl"]
    env = result["env"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", "import gpucheck_probe; print(gpucheck_probe.VALUE)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "42"
    # Nothing missing: nothing installed, environment unchanged.
    again = gpu_check.ensure_dependencies(sys.executable, env, None, str(tmp_path / "x"), modules)
    assert again["installed"] == [] and again["env"] == env


def test_missing_without_wheels_says_what_to_do(tmp_path):
    modules = {"gpucheck_absent": "gpucheck-absent"}
    with pytest.raises(RuntimeError, match="give --wheels DIR"):
        gpu_check.ensure_dependencies(sys.executable, dict(os.environ), None, str(tmp_path), modules)
    with pytest.raises(RuntimeError, match="no wheel for gpucheck-absent"):
        gpu_check.ensure_dependencies(sys.executable, dict(os.environ), str(tmp_path),
                                      str(tmp_path / "site"), modules)


# ----------------------------------------------------------------------------------------------
# Time caps and the report
# ----------------------------------------------------------------------------------------------
def test_phase_caps_share_what_is_left():
    phases = ["tests", "trainer", "bench", "shared_prefix", "fp8", "max_length"]
    caps = [gpu_check.phase_timeout(p, 400.0, phases[i:]) for i, p in enumerate(phases)]
    w = gpu_check.PHASES
    assert caps[0] == pytest.approx(400 * w["tests"] / sum(w[p] for p in phases))
    assert caps[2] == pytest.approx(400 * w["bench"] / sum(w[p] for p in phases[2:]))
    assert caps[-1] == 400.0  # the last phase gets everything left
    # fp8 skipped (no TE): its share goes to the others.
    assert gpu_check.phase_timeout("bench", 300.0, ["bench", "max_length"]) == \
        pytest.approx(300 * w["bench"] / (w["bench"] + w["max_length"]))


def test_pytest_counts():
    text = "....s\n4 passed, 1 skipped, 2 warnings in 12.3s"
    assert gpu_check.parse_pytest_counts(text) == {"passed": 4, "skipped": 1}
    assert gpu_check.parse_pytest_counts("1 failed, 3 passed, 1 error in 2s") == \
        {"failed": 1, "passed": 3, "error": 1}


SAMPLE = {
    "date_utc": "2026-12-02 14:00", "machine": "NVIDIA H200 (139.8 GiB)", "total_seconds": 455.0,
    "phases": {
        "environment": {"returncode": 0, "seconds": 12.0, "data": {
            "gpu": "NVIDIA H200", "torch": "2.9.0", "cuda": "12.8", "transformer_engine": False,
            "megatron_core": "0.19.2", "attention_backend": "reference"}},
        "tests": {"returncode": 0, "seconds": 80.0, "counts": {"passed": 6, "skipped": 3}},
        "trainer": {"returncode": 0, "seconds": 50.0, "data": {
            "iterations": 20, "first_loss": 0.6931, "final_loss": 0.41}},
        "bench": {"returncode": 0, "seconds": 150.0, "data": {"by_length": {
            "8192": {"solopo": {"ratio_to_long_dpo": 0.61, "step_time_s": 0.3},
                     "long_dpo": {"step_time_s": 0.5, "tflops_per_gpu": 310.0}},
            "32768": {"solopo": {"ratio_to_long_dpo": 0.52},
                      "long_dpo": {"error": "out of memory"}}}}},
        "fp8": {"skipped": "Transformer Engine is not importable"},
        "max_length": {"returncode": "timeout", "seconds": 100.0, "data": {
            "max_length": {"solopo": {"max_length": 98304, "time_capped": False},
                           "long_dpo": {"max_length": 45056, "time_capped": True}},
            "max_length_ratio_solopo_to_long_dpo": 2.18}},
    },
}


def test_summary_table_from_phase_results():
    report = json.loads(json.dumps(SAMPLE))
    report["passed"] = all(gpu_check.phase_status(r) in ("passed", "skipped")
                           for r in report["phases"].values())
    assert report["passed"] is False  # the max-length phase timed out
    text = gpu_check.format_summary(report)
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert "NVIDIA H200" in text.splitlines()[0]
    assert "passed" in lines["tests"] and "6 passed, 3 skipped" in lines["tests"]
    assert "loss 0.693 -> 0.41" in lines["trainer"]
    assert "8K: long_dpo 0.5 s 310 TFLOP/s, solopo x0.61" in lines["bench"]
    assert "32K: long_dpo out of memory" in lines["bench"]
    assert "skipped" in lines["fp8"] and "Transformer Engine" in lines["fp8"]
    assert "timeout" in lines["max_length"] and "long_dpo 45056 (capped)" in lines["max_length"]
    assert "ratio 2.18x" in lines["max_length"]
    assert text.splitlines()[-1].endswith("FAILED")


def test_report_only_prints_an_existing_report(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(dict(SAMPLE, passed=True)))
    assert gpu_check.main(["--report-only", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "PASSED" in out
    assert gpu_check.main(["--report-only", str(tmp_path / "none.json")]) == 2


def test_without_cuda_the_check_stops_after_the_environment(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for minutes")
    output = tmp_path / "out" / "check.json"
    assert gpu_check.main(["--phases", "environment,tests,bench", "--output", str(output),
                           "--budget-seconds", "120", "--workdir", str(tmp_path / "w")]) == 1
    report = json.loads(output.read_text())
    env = report["phases"]["environment"]
    assert env["error"] == "CUDA is not available" and env["data"]["missing_before"] == []
    assert env["data"]["cuda_available"] is False
    assert report["phases"]["tests"] == {"skipped": "the environment check failed"}
    assert list(report["phases"]) == ["environment", "tests", "bench"]
    assert report["passed"] is False
    assert "FAILED" in capsys.readouterr().out


def test_phases_run_in_order_with_caps_and_reports(tmp_path, monkeypatch, capsys):
    """The orchestration with stand-in commands: each phase's JSON is loaded into the report, a
    phase without its requirement is skipped with the reason, and the last phase, which would
    run forever, is stopped at the end of the budget (with its whole process group)."""
    python = sys.executable
    bench_json = tmp_path / "bench.json"
    fake_env = {"cuda_available": True, "gpu": "Fake GPU", "gpu_memory_gib": 1.0,
                "transformer_engine": False, "attention_backend": "reference"}
    monkeypatch.setattr(gpu_check, "environment_info", lambda python, env: dict(fake_env))

    def commands(python_, workdir, attention, te):
        assert attention == "reference" and te is False
        write = f"import json; json.dump({{'by_length': {{}}}}, open({str(bench_json)!r}, 'w'))"
        return {
            "tests": ([python, "-c", "print('3 passed, 1 skipped in 0.1s')"], None),
            "trainer": ([python, "-c", "import sys; sys.exit(3)"], None),
            "bench": ([python, "-c", write], str(bench_json)),
            "shared_prefix": ([python, "-c", "pass"], None),
            "fp8": ("Transformer Engine is not importable", None),
            "max_length": ([python, "-c", "import subprocess; subprocess.run(['sleep', '1000'])",
                            "--search-seconds", "{search_seconds}"], None),
        }

    monkeypatch.setattr(gpu_check, "phase_commands", commands)
    output = tmp_path / "check.json"
    start = time.monotonic()
    assert gpu_check.main(["--output", str(output), "--budget-seconds", "15",
                           "--workdir", str(tmp_path / "w")]) == 1
    assert time.monotonic() - start < 60
    report = json.loads(output.read_text())
    phases = report["phases"]
    assert list(phases) == list(gpu_check.PHASES)
    assert phases["tests"]["returncode"] == 0 and phases["tests"]["counts"] == {"passed": 3, "skipped": 1}
    assert phases["trainer"]["returncode"] == 3
    assert phases["bench"]["data"] == {"by_length": {}}
    assert phases["fp8"] == {"skipped": "Transformer Engine is not importable"}
    assert phases["max_length"]["returncode"] == "timeout"
    assert "--search-seconds 10" in phases["max_length"]["command"]
    assert report["machine"] == "Fake GPU (1.0 GiB)" and report["passed"] is False
    out = capsys.readouterr().out
    assert "timeout" in out and "FAILED" in out
