"""Test tiers and markers (see docs/testing.md).

- ``tests/unit``: single process, fast.
- ``tests/distributed`` (marker ``distributed``): gloo ranks spawned by the test (tests/harness.py).
- ``tests/gpu`` (marker ``gpu``): needs CUDA and Transformer Engine; skipped, and reported as
  skipped, without them.
- marker ``slow``: longer than ~30 s on 2 cores; run with ``--run-slow`` or SOLOPO_RUN_SLOW=1.
"""

from __future__ import annotations

import os

import pytest

import megatron_solopo  # noqa: F401  (registers the triton stub before any megatron import)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow")


def _gpu_ready() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "needs CUDA"
    from megatron_solopo.model.build import te_available

    if not te_available():
        return False, "needs Transformer Engine"
    return True, ""


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("SOLOPO_RUN_SLOW") == "1"
    gpu_ok, gpu_reason = None, ""
    for item in items:
        if "gpu" in item.keywords:
            if gpu_ok is None:
                gpu_ok, gpu_reason = _gpu_ready()
            if not gpu_ok:
                item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
