"""tools/precompute_reference.py keeps a fresh cache (a requeued job does not redo the reference
pass) and recomputes one that is stale, partial, or when forced; every rank takes the same
decision (DP=2 here)."""

import copy
import io
import os
import shutil
from contextlib import redirect_stdout

import numpy as np
import pytest

from megatron_solopo.config import config_from_dict
from tests.distributed.trainer_common import base_config, make_dataset, write_initial
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def run_precompute(raw: dict, force: bool = False) -> dict:
    """Rank function: precompute_reference, its stdout and the paths it returns."""
    from megatron_solopo.training.precompute import precompute_reference

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        paths = precompute_reference(config_from_dict(raw), force=force)
    return {"output": buffer.getvalue(), "paths": paths}


def snapshot(path: str) -> tuple:
    with open(path, "rb") as handle:
        return os.stat(path).st_mtime_ns, handle.read()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    paths = make_dataset(root / "data", num_records=8, long_length=60)
    paths["init"] = str(root / "init")
    raw = base_config(paths, str(root))
    raw["data"]["valid_prefix"] = paths["valid"]
    run_distributed(write_initial, 1, raw, paths["init"])
    from megatron_solopo.training.reference import run_cache_path

    config = config_from_dict(raw)
    caches = [run_cache_path(config, paths[split]) for split in ("train", "valid")]
    return raw, caches, root


def test_fresh_cache_is_skipped_forced_or_new_checkpoint_recomputes(setup):
    from megatron_solopo.training.reference import ReferenceCache

    raw, caches, root = setup
    first = run_distributed(run_precompute, 2, raw)
    assert all(result["paths"] == caches for result in first)
    assert first[0]["output"].count("computing (no cache yet)") == 2, first[0]["output"]
    before = [snapshot(path) for path in caches]
    original = ReferenceCache.load(caches[0])

    # Requeued job: both targets fresh, no file touched, every rank returns the same paths.
    second = run_distributed(run_precompute, 2, raw)
    output = second[0]["output"]
    for path in caches:
        assert f"reference log-probs {path}: fresh" in output and "skipped" in output, output
    assert "computing" not in output
    assert all(result["paths"] == caches for result in second)
    assert [snapshot(path) for path in caches] == before

    # --force recomputes (same values: same checkpoint and data).
    forced = run_distributed(run_precompute, 1, raw, True)
    assert forced[0]["output"].count("computing (--force)") == 2
    assert [snapshot(path)[0] for path in caches] != [mtime for mtime, _ in before]
    np.testing.assert_allclose(ReferenceCache.load(caches[0]).logps, original.logps, rtol=1e-6)

    # Another reference checkpoint (other seed, other path): caches of its own beside these,
    # which stay as they are (a run with the first reference still finds its caches).
    forced_snapshots = [snapshot(path) for path in caches]
    other = copy.deepcopy(raw)
    other["training"]["seed"] = raw["training"]["seed"] + 1
    other["reference"]["checkpoint"] = other["checkpoint"]["load"] = str(root / "init_other")
    run_distributed(write_initial, 1, other, str(root / "init_other"))
    beside = run_distributed(run_precompute, 2, other)
    assert beside[0]["output"].count("computing (no cache yet)") == 2, beside[0]["output"]
    assert not set(beside[0]["paths"]) & set(caches)
    assert [snapshot(path) for path in caches] == forced_snapshots

    # The same path now holding other weights (e.g. converted again): stale by fingerprint,
    # recomputed with the new one.
    shutil.rmtree(raw["checkpoint"]["load"])
    shutil.copytree(root / "init_other", raw["checkpoint"]["load"])
    changed = run_distributed(run_precompute, 2, raw)
    assert changed[0]["output"].count("computing (computed from another checkpoint") == 2, \
        changed[0]["output"]
    recomputed = ReferenceCache.load(caches[0])
    assert recomputed.metadata["checkpoint_fingerprint"] != original.metadata["checkpoint_fingerprint"]
    assert not np.allclose(np.nan_to_num(recomputed.logps), np.nan_to_num(original.logps))


def test_partial_or_other_model_cache_is_stale(setup, tmp_path):
    """cache_staleness on edited copies of a fresh cache (single process)."""
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.roles import Role
    from megatron_solopo.training.precompute import cache_staleness
    from megatron_solopo.training.reference import ReferenceCache

    raw, caches, root = setup
    if not os.path.exists(caches[0]):
        run_distributed(run_precompute, 1, raw)
    cache = ReferenceCache.load(caches[0])
    dataset = PreferenceDataset(raw["data"]["train_prefix"])
    roles = [Role(value) for value in cache.metadata["roles"]]
    kwargs = dict(fingerprint=cache.metadata["checkpoint_fingerprint"], dataset=dataset,
                  roles=roles, model=dict(cache.metadata["model"]))
    path = str(tmp_path / "copy.npz")
    cache.save(path)
    assert cache_staleness(path, **kwargs) is None
    assert cache_staleness(str(tmp_path / "absent.npz"), **kwargs) == "no cache yet"

    holes = copy.deepcopy(cache)
    holes.logps[3, roles[0].index] = np.nan
    holes.save(path)
    assert cache_staleness(path, **kwargs).startswith("partial: no ")

    fewer_roles = copy.deepcopy(cache)
    fewer_roles.metadata["roles"] = cache.metadata["roles"][:-1]
    fewer_roles.save(path)
    assert cache_staleness(path, **kwargs).startswith("partial: lacks role(s)")

    cache.save(path)
    other_model = dict(kwargs, model=dict(kwargs["model"], rotary_base=1e6))
    assert "rotary_base" in cache_staleness(path, **other_model)
    assert "another checkpoint" in cache_staleness(path, **dict(kwargs, fingerprint="0" * 64))
    with open(path, "wb") as handle:
        handle.write(b"truncated")
    assert cache_staleness(path, **kwargs).startswith("cannot read it")


def test_reference_free_run_has_nothing_to_precompute(setup):
    from megatron_solopo.training.precompute import precompute_reference

    raw, _, _ = setup
    simpo = base_config({"tokenizer": raw["tokenizer"]["tokenizer_model"],
                         "train": raw["data"]["train_prefix"]}, "",
                        objective={"name": "solopo", "base": "simpo"})
    simpo["reference"]["mode"] = "auto"
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert precompute_reference(config_from_dict(simpo)) == []
    assert "nothing to precompute: reference.mode=none" in buffer.getvalue()


def test_objectives_with_the_same_reference_share_one_cache_merged_per_role(setup):
    """A Long-DPO precompute on a SoLoPO run's data adds its roles to the SoLoPO cache instead of
    replacing it: the SoLoPO run still finds its roles fresh afterwards."""
    from megatron_solopo.training.reference import ReferenceCache

    raw, caches, root = setup
    solopo = copy.deepcopy(raw)
    solopo["data"]["valid_prefix"] = None
    run_distributed(run_precompute, 1, solopo)
    before = ReferenceCache.load(caches[0])
    long_dpo = copy.deepcopy(solopo)
    long_dpo["objective"] = {"name": "long_dpo", "beta": 0.1}
    (result,) = run_distributed(run_precompute, 1, long_dpo)
    assert result["paths"] == [caches[0]]
    assert "computing (partial: lacks role(s)" in result["output"], result["output"]
    merged = ReferenceCache.load(caches[0])
    assert set(merged.metadata["roles"]) == set(before.metadata["roles"]) | {"long/chosen",
                                                                             "long/rejected"}
    for value in before.metadata["roles"]:
        from megatron_solopo.roles import Role

        column = Role(value).index
        np.testing.assert_allclose(merged.logps[:, column], before.logps[:, column], rtol=1e-6)
    (again,) = run_distributed(run_precompute, 1, solopo)
    assert ": fresh" in again["output"] and "computing" not in again["output"], again["output"]
