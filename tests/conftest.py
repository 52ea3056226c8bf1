"""Test tiers and markers (see docs/testing.md).

- ``tests/unit``: single process, fast.
- ``tests/distributed`` (marker ``distributed``): gloo ranks spawned by the test (tests/harness.py).
- ``tests/gpu`` (marker ``gpu``): needs CUDA (marker ``te`` too: Transformer Engine); skipped, and
  reported as skipped, without them.
- marker ``slow``: longer than ~30 s on 2 cores; run with ``--run-slow`` or SOLOPO_RUN_SLOW=1.
"""

from __future__ import annotations

import os

import pytest

import megatron_solopo  # noqa: F401  (registers the triton stub before any megatron import)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow")


def _skip_reason(item) -> str:
    """Why a ``gpu``/``te`` test cannot run here ('' if it can)."""
    import torch

    if ("gpu" in item.keywords or "te" in item.keywords) and not torch.cuda.is_available():
        return "needs CUDA"
    if "te" in item.keywords:
        from megatron_solopo.model.build import te_available

        if not te_available():
            return "needs Transformer Engine"
    return ""


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("SOLOPO_RUN_SLOW") == "1"
    for item in items:
        reason = _skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
