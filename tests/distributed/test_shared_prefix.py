"""Shared-prefix packing is exact: with ``[prefix | chosen | rejected]`` segments the per-sequence
log-prob sums and token counts, the objective's loss and every parameter gradient equal those of
the unshared single-process model (fp32, 1e-5 relative) for DPO, Long-DPO, LongPO (single and
multi-turn) and SoLoPO with ``solo_ra: both``, under TP=2, PP=2, CP=2, CP=2 x TP=2 and DP=2;
FlexAttention (forward only on CPU) agrees with the reference; a 5-step training run and the
precomputed reference cache do not depend on the switch."""

import copy

import numpy as np
import pytest

from tests.distributed.shared_common import (OBJECTIVES, check_all_objectives,
                                             check_flex_forward, check_shared_prefix)
from tests.distributed.trainer_common import base_config, prepare_starting_point, train
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "single": (1, dict()),
    "tp2": (2, dict(tensor_model_parallel_size=2)),
    "pp2": (2, dict(pipeline_model_parallel_size=2)),
    "cp2": (2, dict(context_parallel_size=2)),
    "cp2_tp2": (4, dict(context_parallel_size=2, tensor_model_parallel_size=2)),
    "dp2": (2, dict()),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharing_matches_unshared_single_process(name):
    world, fields = LAYOUTS[name]
    results = run_distributed(check_all_objectives, world, fields)
    # The last pipeline stage compared the micro-batches it processed, for every objective.
    for objective in OBJECTIVES:
        assert sum(r[objective] for r in results) >= 1, (objective, results)


def test_sequence_parallel_under_context_parallel():
    run_distributed(check_shared_prefix, 4, dict(context_parallel_size=2,
                                                 tensor_model_parallel_size=2,
                                                 sequence_parallel=True), "longpo_multiturn")


@pytest.mark.parametrize("cp", [1, 2])
def test_flex_attention_matches_reference_forward(cp):
    pytest.importorskip("torch.nn.attention.flex_attention")
    results = run_distributed(check_flex_forward, cp, dict(context_parallel_size=cp),
                              "solopo_both")
    assert all(r == {False: 2, True: 2} for r in results)


LONGPO = {"name": "longpo", "beta": 0.5, "lambda": 1.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("shared")
    tokenizer = synthetic.train_sentencepiece_tokenizer(str(root / "tok"), vocab_size=200)
    records = synthetic.generate_records("kv_retrieval", 16, seed=5, long_length=80, num_turns=2)
    synthetic.write_jsonl(records, str(root / "train.jsonl"))
    preprocess([str(root / "train.jsonl")], str(root / "train"), "SentencePieceTokenizer", tokenizer)
    paths = {"tokenizer": tokenizer, "train": str(root / "train"), "init": str(root / "init")}
    # The starting point's reference cache is precomputed with sharing (the default).
    run_distributed(prepare_starting_point, 1, config(paths, root), paths["init"])
    return paths, root


def config(paths, root, **data):
    raw = base_config(paths, str(root), objective=LONGPO,
                      data={"max_tokens_per_micro_batch": 900, **data},
                      training={"train_iters": 5, "global_batch_size": 4, "seed": 7})
    raw["model"]["attention_backend"] = "reference"
    return raw


def _precompute(raw, output):
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.precompute import precompute_reference

    precompute_reference(config_from_dict(raw), output=output, force=True)


def test_reference_cache_does_not_depend_on_sharing(setup, tmp_path):
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.reference import ReferenceCache, run_cache_path

    paths, root = setup
    raw = config(paths, root, shared_prefix=False)
    raw["reference"]["checkpoint"] = raw["checkpoint"]["load"] = paths["init"]
    run_distributed(_precompute, 1, raw, str(tmp_path / "unshared.npz"))
    # The set-up precomputed the run's own cache with sharing (the default).
    shared = ReferenceCache.load(run_cache_path(config_from_dict(raw), paths["train"])).logps
    unshared = ReferenceCache.load(str(tmp_path / "unshared.npz")).logps
    assert np.isnan(shared).sum() == np.isnan(unshared).sum() < shared.size
    np.testing.assert_allclose(shared, unshared, rtol=1e-5)


def _expect_shared(trainer):
    assert trainer.builder.shared_prefix
    if trainer.reference_model is not None:
        assert trainer.reference_builder.shared_prefix


def _expect_unshared(trainer):
    assert not trainer.builder.shared_prefix


def test_training_trajectory_does_not_depend_on_sharing(setup):
    """5 LongPO steps on multi-turn records under CP=2: sharing on (precomputed reference, and a
    live reference packed the same way) and off give the same losses and gradient norms."""
    paths, root = setup
    runs = {}
    for name, data, reference in (("unshared", {"shared_prefix": False}, "precomputed"),
                                  ("shared", {"shared_prefix": True}, "precomputed"),
                                  ("shared_live", {"shared_prefix": True}, "live")):
        raw = copy.deepcopy(config(paths, root, **data))
        raw["parallel"] = {"context_parallel_size": 2}
        raw["reference"]["mode"] = reference
        raw["checkpoint"]["save"] = str(root / f"ckpt-{name}")
        expect = _expect_unshared if name == "unshared" else _expect_shared
        results = run_distributed(train, 2, raw, patch=expect)
        (result,) = [r for r in results if r["logging_rank"]]
        runs[name] = [(row["loss"], row["grad_norm"]) for row in result["history"]
                      if "loss" in row and not row.get("eval")]
    assert len(runs["unshared"]) == 5
    for name in ("shared", "shared_live"):
        np.testing.assert_allclose(runs[name], runs["unshared"], rtol=1e-4, err_msg=name)
