#!/usr/bin/env python
"""One command that proves the GPU paths on one H100/H200 in at most ~8 minutes (``make gpu-check``).

    python tools/gpu_check.py [--wheels DIR] [--output gpu_check.json] [--budget-seconds 480]

Works from a bare machine that has torch with CUDA (and transformers) but not megatron-core or
Transformer Engine: whatever the check needs and cannot import (megatron-core, pyyaml,
sentencepiece, tqdm, psutil, pytest, ...) is installed from local wheel files (``--wheels DIR``,
default ``$WHEELS``) with ``pip install --no-index --no-deps --target <tmp>`` and put on
``PYTHONPATH`` for every phase; nothing is downloaded. ``--download-wheels DIR`` fills such a
directory on a machine with access to a package index (``--python-version`` / ``--platform`` for
another target).

Phases, each a subprocess with its own time cap (``--budget-seconds`` is split by PHASES' weights
and the time left):

    environment  torch, CUDA, GPU, Transformer Engine, megatron-core (installed if needed)
    tests        pytest tests/gpu (CUDA, NCCL, TE tests; skipped ones reported as skipped)
    trainer      the demo's SoLoPO run (data, init checkpoint, reference precompute, training with
                 evaluation and a checkpoint) on one GPU, bf16, 20 steps
    bench        benchmarks/bench_step.py at 8K/16K/32K for a Llama-3.2-1B-shaped random model,
                 bf16, the fastest attention available (TE, else a non-TE GPU backend the model
                 config offers, else the reference one)
    shared_prefix  bench_step.py --shared-prefix both: Long-DPO and LongPO at 16K with and
                 without shared-prefix packing, in one run
    fp8          the same at 16K with FP8 GEMMs (Transformer Engine only; otherwise skipped)
    max_length   bench_step.py --find-max-length (real out-of-memory search, time-capped) for
                 SoLoPO and Long-DPO, with the planner's estimate

It prints one summary table and writes a JSON report (``--output``) whose phases carry the
numbers for benchmarks/RESULTS.md. Exit status: 0 when every phase passed or was skipped for a
stated reason, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

# module to import -> distribution to install; the repo's dependencies plus pytest.
REQUIRED_MODULES = {
    "megatron.core": "megatron-core", "numpy": "numpy", "packaging": "packaging",
    "yaml": "pyyaml", "sentencepiece": "sentencepiece", "tqdm": "tqdm", "psutil": "psutil",
    "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig",
}
DOWNLOAD_SPECS = ["megatron-core==0.19.2", "numpy<2.5", "packaging>=24.2", "pyyaml",
                  "sentencepiece", "tqdm", "psutil", "pytest", "pluggy", "iniconfig"]

# Share of the time budget per phase; a phase gets its share of what is left among the phases
# still to run, so time a phase does not use (or a skipped phase's) goes to the later ones.
PHASES = {"environment": 0.0, "tests": 0.25, "trainer": 0.12, "bench": 0.30,
          "shared_prefix": 0.12, "fp8": 0.08, "max_length": 0.18}
BENCH_LENGTHS = (8192, 16384, 32768)
FP8_LENGTH = 16384
SHARED_PREFIX_LENGTH = 16384


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", default=os.environ.get("WHEELS") or None,
                        help="directory of wheel files for what is not importable (default $WHEELS)")
    parser.add_argument("--output", default="gpu_check.json", help="JSON report (written atomically)")
    parser.add_argument("--budget-seconds", type=float, default=480.0,
                        help="the whole check's time budget (default 8 minutes)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of: {', '.join(PHASES)}")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--download-wheels", metavar="DIR",
                        help="only download the wheels the check may need into DIR, then exit")
    parser.add_argument("--python-version", help="with --download-wheels: target Python, e.g. 3.12")
    parser.add_argument("--platform", help="with --download-wheels: target platform tag, e.g. "
                                           "manylinux_2_28_x86_64")
    parser.add_argument("--report-only", metavar="JSON",
                        help="print the summary table of an existing report and exit")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise UsageError(f"--phases: unknown {', '.join(unknown) or '(none given)'}; valid: "
                         f"{', '.join(PHASES)}")
    args.phase_list = [p for p in PHASES if p in phases]
    if args.budget_seconds <= 0:
        raise UsageError(f"--budget-seconds must be > 0, got {args.budget_seconds}")
    if args.wheels and not os.path.isdir(args.wheels):
        raise UsageError(f"--wheels {args.wheels}: not a directory")
    if (args.python_version or args.platform) and not args.download_wheels:
        raise UsageError("--python-version/--platform go with --download-wheels")
    return args


# ----------------------------------------------------------------------------------------------
# Installing what is missing from local wheels
# ----------------------------------------------------------------------------------------------
def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> str:
    """The distribution a wheel file holds (PEP 427: ``{name}-{version}-...whl``)."""
    return normalize(os.path.basename(filename).split("-", 1)[0])


def missing_modules(python: str, env: dict, modules=REQUIRED_MODULES) -> list[str]:
    """Modules of ``modules`` that ``python`` cannot import in ``env`` (one subprocess)."""
    code = ("import importlib.util, json, sys\nmissing = []\nfor name in sys.argv[1:]:\n"
            "    try:\n        found = importlib.util.find_spec(name) is not None\n"
            "    except ModuleNotFoundError:\n        found = False\n"
            "    if not found:\n        missing.append(name)\nprint(json.dumps(missing))")
    out = subprocess.run([python, "-c", code, *modules], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def wheels_for(missing: list[str], wheels_dir: str,
               modules=REQUIRED_MODULES) -> tuple[list[str], list[str]]:
    """(wheel files that provide the missing modules' distributions, distributions with none)."""
    wanted = {normalize(modules[m]) for m in missing}
    files = sorted(os.path.join(wheels_dir, f) for f in os.listdir(wheels_dir) if f.endswith(".whl"))
    chosen = [f for f in files if wheel_distribution(f) in wanted]
    have = {wheel_distribution(f) for f in chosen}
    return chosen, sorted(wanted - have)


def install_command(python: str, wheels: list[str], target: str) -> list[str]:
    return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
            "--disable-pip-version-check", "--target", target, *wheels]


def with_pythonpath(env: dict, *paths: str) -> dict:
    current = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join([*paths, *[p for p in current if p not in paths]]))


def ensure_dependencies(python: str, env: dict, wheels_dir: Optional[str], target: str,
                        modules=REQUIRED_MODULES) -> dict:
    """Install from ``wheels_dir`` into ``target`` whatever of ``modules`` is missing; returns
    what happened and the environment the phases use (``target`` first on PYTHONPATH). Raises
    RuntimeError naming what cannot be provided."""
    missing = missing_modules(python, env, modules)
    result = {"missing_before": missing, "installed": []}
    if missing:
        if not wheels_dir:
            raise RuntimeError(f"not importable: {', '.join(missing)}; give --wheels DIR (or "
                               f"WHEELS=DIR) with their wheel files, made with "
                               f"`python tools/gpu_check.py --download-wheels DIR`")
        wheels, absent = wheels_for(missing, wheels_dir, modules)
        if absent:
            raise RuntimeError(f"{wheels_dir} has no wheel for {', '.join(absent)} (needed for "
                               f"{', '.join(missing)})")
        os.makedirs(target, exist_ok=True)
        proc = subprocess.run(install_command(python, wheels, target), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install from {wheels_dir} failed:\n{proc.stderr[-2000:]}")
        result["installed"] = [os.path.basename(w) for w in wheels]
        env = with_pythonpath(env, target)
        still = missing_modules(python, env, modules)
        if still:
            raise RuntimeError(f"still not importable after installing the wheels: "
                               f"{', '.join(still)}")
    result["env"] = env
    return result


def download_command(python: str, directory: str, python_version: Optional[str],
                     platform_tag: Optional[str]) -> list[str]:
    command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", directory]
    if python_version:
        command += ["--python-version", python_version]
    if platform_tag:
        command += ["--platform", platform_tag]
    return command + DOWNLOAD_SPECS


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------
def phase_timeout(phase: str, remaining: float, phases_left: list[str]) -> float:
    """This phase's cap: its share of the time left among ``phases_left`` (this one first); the
    last phase gets all of it."""
    if len(phases_left) <= 1:
        return max(1.0, remaining)
    share = PHASES[phase] / max(sum(PHASES[p] for p in phases_left), 1e-9)
    return max(1.0, remaining * min(1.0, share))


def run_phase(command: list[str], env: dict, timeout: float, log_path: str) -> dict:
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the phase's process group (its workers too)
            proc.wait()
            code = "timeout"
    with open(log_path, errors="replace") as handle:
        tail = handle.read()[-4000:]
    return {"command": " ".join(command), "returncode": code,
            "seconds": round(time.monotonic() - start, 1), "log_tail": tail}


def pick_attention_backend() -> str:
    """TE where it imports, else a non-TE GPU backend the model config offers (anything but
    auto/te/reference), else the reference one."""
    import typing

    from megatron_solopo.model.build import te_available
    from megatron_solopo.model.config import ModelConfig

    if te_available():
        return "te"
    choices = typing.get_args(typing.get_type_hints(ModelConfig)["attention_backend"])
    fast = [c for c in choices if c not in ("auto", "te", "reference")]
    return fast[0] if fast else "reference"


def parse_pytest_counts(text: str) -> dict:
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", text):
        counts["error" if word.startswith("error") else word] = int(number)
    return counts


def bench_command(python: str, output: str, lengths, *, attention: str, precision: str,
                  objectives: str, extra=()) -> list[str]:
    return [python, "benchmarks/bench_step.py", "--preset", "llama-1b", "--objectives", objectives,
            "--long-length", ",".join(str(n) for n in lengths), "--short-length", "1024",
            "--response-length", "256", "--steps", "3", "--warmup", "1",
            "--attention-backend", attention, "--precision", precision, "--json", output, *extra]


def phase_commands(python: str, workdir: str, attention: str, te: bool) -> dict:
    """phase -> (command, JSON it writes or None), or a string: why it is skipped."""
    return {
        "tests": ([python, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"], None),
        "trainer": ([python, "-m", "megatron_solopo.demo", "--nproc", "1", "--train-iters", "20",
                     "--workdir", os.path.join(workdir, "demo"), "precision.bf16=true"],
                    os.path.join(workdir, "demo", "summary.json")),
        "bench": (bench_command(python, os.path.join(workdir, "bench.json"), BENCH_LENGTHS,
                                attention=attention, precision="bf16",
                                objectives="solopo,long_dpo,longpo"),
                  os.path.join(workdir, "bench.json")),
        "shared_prefix": (bench_command(python, os.path.join(workdir, "shared_prefix.json"),
                                        [SHARED_PREFIX_LENGTH], attention=attention,
                                        precision="bf16", objectives="long_dpo,longpo",
                                        extra=["--shared-prefix", "both"]),
                          os.path.join(workdir, "shared_prefix.json")),
        "fp8": (bench_command(python, os.path.join(workdir, "fp8.json"), [FP8_LENGTH],
                              attention=attention, precision="fp8", objectives="solopo,long_dpo")
                if te else "Transformer Engine is not importable",
                os.path.join(workdir, "fp8.json")),
        "max_length": (bench_command(python, os.path.join(workdir, "max_length.json"), [8192],
                                     attention=attention, precision="bf16",
                                     objectives="solopo,long_dpo",
                                     extra=["--skip-steps", "--find-max-length",
                                            "--search-granularity", "1024", "--search-seconds",
                                            "{search_seconds}"]),
                       os.path.join(workdir, "max_length.json")),
    }


def environment_info(python: str, env: dict) -> dict:
    code = ("import json, torch\ninfo = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'cuda_available': torch.cuda.is_available()}\n"
            "if torch.cuda.is_available():\n    p = torch.cuda.get_device_properties(0)\n"
            "    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), "
            "gpu_count=torch.cuda.device_count())\n"
            "try:\n    from megatron_solopo.model.build import te_available\n"
            "    info['transformer_engine'] = te_available()\n"
            "except Exception as err:\n    info['transformer_engine'] = False\n"
            "import megatron.core\ninfo['megatron_core'] = megatron.core.__version__\n"
            "from tools.gpu_check import pick_attention_backend\n"
            "info['attention_backend'] = pick_attention_backend()\nprint(json.dumps(info))")
    out = subprocess.run([python, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"the environment check failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def phase_status(result: dict) -> str:
    if result.get("skipped"):
        return "skipped"
    code = result.get("returncode")
    if code == 0:
        return "passed"
    return "timeout" if code == "timeout" else "failed"


def _num(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def phase_summary(name: str, result: dict) -> str:
    """One line of what a phase measured, from its JSON (``result['data']``)."""
    data = result.get("data") or {}
    if result.get("skipped"):
        return result["skipped"]
    if name == "tests":
        counts = result.get("counts", {})
        return ", ".join(f"{v} {k}" for k, v in counts.items()) or "-"
    if name == "trainer" and data:
        return (f"{data.get('iterations')} steps, loss {_num(data.get('first_loss'))} -> "
                f"{_num(data.get('final_loss'))}")
    if name in ("bench", "fp8") and data:
        parts = []
        for length, rows in sorted(data.get("by_length", {}).items(), key=lambda kv: int(kv[0])):
            solopo, base = rows.get("solopo", {}), rows.get("long_dpo", {})
            if base.get("error"):
                parts.append(f"{int(length) // 1024}K: long_dpo {base['error']}")
                continue
            parts.append(f"{int(length) // 1024}K: long_dpo {_num(base.get('step_time_s'))} s "
                         f"{_num(base.get('tflops_per_gpu'))} TFLOP/s, solopo x"
                         f"{_num(solopo.get('ratio_to_long_dpo'))}")
        return "; ".join(parts) or "-"
    if name == "max_length" and data:
        found = data.get("max_length", {})
        parts = [f"{key} {_num(row.get('max_length'))}" + (" (capped)" if row.get("time_capped") else "")
                 for key, row in found.items()]
        ratio = data.get("max_length_ratio_solopo_to_long_dpo")
        if ratio:
            parts.append(f"ratio {ratio:.2f}x")
        return ", ".join(parts) or "-"
    if name == "environment":
        return (f"{data.get('gpu', 'no GPU')}, torch {data.get('torch')}, CUDA {data.get('cuda')}, "
                f"TE {'yes' if data.get('transformer_engine') else 'no'}, megatron-core "
                f"{data.get('megatron_core')}, attention {data.get('attention_backend')}")
    return (result.get("error") or "")[:100] or "-"


def format_summary(report: dict) -> str:
    rows = [("phase", "status", "seconds", "result")]
    for name, result in report["phases"].items():
        rows.append((name, phase_status(result), _num(result.get("seconds")),
                     phase_summary(name, result)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    lines = [f"GPU check {report.get('date_utc', '')}: {report.get('machine', '')}"]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    lines.append(f"total {report.get('total_seconds', '-')} s; overall: "
                 f"{'PASSED' if report.get('passed') else 'FAILED'}")
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpu-check-", dir=directory)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def _load(path: Optional[str]):
    if path and os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return None


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def run_check(args) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_seconds
    python = sys.executable
    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="gpu-check-") if own_workdir else args.workdir
    os.makedirs(workdir, exist_ok=True)
    report = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "budget_seconds": args.budget_seconds, "phases": {}}
    env = with_pythonpath(dict(os.environ, PYTHONUNBUFFERED="1"), str(REPO))
    try:
        phase_start = time.monotonic()
        try:
            deps = ensure_dependencies(python, env, args.wheels, os.path.join(workdir, "site"))
            env = deps.pop("env")
            info = environment_info(python, env)
            report["phases"]["environment"] = {"returncode": 0, "data": dict(info, **deps)}
        except (RuntimeError, subprocess.SubprocessError) as err:
            report["phases"]["environment"] = {"returncode": 1, "error": str(err)}
            info = None
        report["phases"]["environment"]["seconds"] = round(time.monotonic() - phase_start, 1)
        if info is not None:
            report["machine"] = f"{info.get('gpu', 'no GPU')} ({info.get('gpu_memory_gib', '?')} GiB)"
            if not info.get("cuda_available"):
                report["phases"]["environment"].update(returncode=1, error="CUDA is not available")
                info = None
        commands = phase_commands(python, workdir, (info or {}).get("attention_backend", "reference"),
                                  bool((info or {}).get("transformer_engine")))
        todo = []
        for name in args.phase_list:
            if name == "environment":
                continue
            if info is None:
                report["phases"][name] = {"skipped": "the environment check failed"}
            elif isinstance(commands[name][0], str):
                report["phases"][name] = {"skipped": commands[name][0]}
            else:
                todo.append(name)
        for index, name in enumerate(todo):
            command, output = commands[name]
            remaining = deadline - time.monotonic()
            if remaining < 10:
                report["phases"][name] = {"skipped": "no time left in --budget-seconds"}
                continue
            timeout = phase_timeout(name, remaining, todo[index:])
            # The search (per objective: SoLoPO and Long-DPO) stops itself in time to report,
            # leaving each worker ~40 s to start and load the model.
            command = [c.replace("{search_seconds}", str(int(max(10, timeout / 2 - 40))))
                       for c in command]
            result = run_phase(command, env, timeout, os.path.join(workdir, f"{name}.log"))
            result["timeout_s"] = round(timeout)
            result["data"] = _load(output)
            if name == "tests":
                result["counts"] = parse_pytest_counts(result["log_tail"])
            report["phases"][name] = result
            write_json(args.output, report)  # what ran so far survives an interrupted check
    finally:
        report["phases"] = {name: report["phases"][name] for name in PHASES
                            if name in report["phases"]}
        report["total_seconds"] = round(time.monotonic() - started, 1)
        report["passed"] = all(phase_status(r) in ("passed", "skipped")
                               for r in report["phases"].values())
        write_json(args.output, report)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: Optional[list] = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.report_only:
        report = _load(args.report_only)
        if report is None:
            print(f"error: --report-only {args.report_only}: no such file", file=sys.stderr)
            return 2
        print(format_summary(report))
        return 0
    if args.download_wheels:
        os.makedirs(args.download_wheels, exist_ok=True)
        return subprocess.run(download_command(sys.executable, args.download_wheels,
                                               args.python_version, args.platform)).returncode
    report = run_check(args)
    print(format_summary(report))
    print(f"report: {os.path.abspath(args.output)}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
