"""Multi-turn records (LongPO: several questions about one document, each asked from its own
chunk) through the trainer: the precomputed short-context reference of a record is the sum of its
turns' log-probs (checked against transformers on the converted checkpoint), and training keeps
the single-process trajectory under DP=2 and TP=2 with a live or a precomputed reference."""

import copy
import math

import numpy as np
import pytest
import torch

from tests.distributed.trainer_common import (base_config, logging_result,
                                              prepare_starting_point, train)
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

LONGPO = {"name": "longpo", "beta": 0.5, "lambda": 1.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("multiturn")
    tokenizer = synthetic.train_sentencepiece_tokenizer(str(root / "tok"), vocab_size=200)
    records = synthetic.generate_records("kv_retrieval", 24, seed=3, long_length=100, num_turns=2)
    assert all(len(record["turns"]) == 2 for record in records)
    synthetic.write_jsonl(records, str(root / "train.jsonl"))
    preprocess([str(root / "train.jsonl")], str(root / "train"), "SentencePieceTokenizer", tokenizer)
    paths = {"tokenizer": tokenizer, "train": str(root / "train"), "init": str(root / "init")}
    raw = base_config(paths, str(root), objective=LONGPO, data={"max_tokens_per_micro_batch": 900})
    run_distributed(prepare_starting_point, 1, raw, paths["init"])
    return paths, root


def config(setup, **sections):
    paths, root = setup
    sections.setdefault("data", {})["max_tokens_per_micro_batch"] = 900
    return base_config(paths, str(root), objective=LONGPO, **sections)


def test_reference_cache_sums_the_turns(setup, tmp_path):
    from megatron_solopo.convert.megatron_to_hf import megatron_to_hf
    from megatron_solopo.convert.verify import hf_logprobs
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.roles import Role
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.reference import ReferenceCache, run_cache_path

    paths, _ = setup
    dataset = PreferenceDataset(paths["train"])
    cache = ReferenceCache.load(run_cache_path(config_from_dict(config(setup)), paths["train"]))
    hf_dir = megatron_to_hf(paths["init"], tmp_path / "hf")
    for index in range(3):
        group = dataset.get_group(index, [Role.SHORT_CHOSEN, Role.SHORT_REJECTED])
        assert cache.record_ids[index] == group.record_id
        for role, turns in group.sequences.items():
            assert len(turns) == 2
            per_turn = hf_logprobs(str(hf_dir), [ids.tolist() for ids, _ in turns])
            expected = sum(float(logps.double()[torch.as_tensor(mask[1:])].sum())
                           for logps, (_, mask) in zip(per_turn, turns, strict=True))
            actual = cache.logps[index, role.index]
            assert math.isclose(actual, expected, rel_tol=1e-5), (index, role, actual, expected)
    # LongPO's reference is on the short context only.
    assert np.isnan(cache.logps[:, Role.LONG_CHOSEN.index]).all()


@pytest.fixture(scope="module")
def single_process_losses(setup):
    return logging_result(run_distributed(train, 1, config(setup)))["losses"]


@pytest.mark.parametrize("layout", [dict(), dict(tensor_model_parallel_size=2)], ids=["dp2", "tp2"])
def test_multiturn_longpo_trajectory_matches_single_process(setup, single_process_losses, layout):
    losses = logging_result(run_distributed(train, 2, config(setup, parallel=layout)))["losses"]
    assert len(losses) == len(single_process_losses) == 4
    for step, (a, b) in enumerate(zip(losses, single_process_losses), start=1):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), f"step {step}: {a} vs {b}"
    assert losses[-1] < losses[0]


def test_multiturn_live_reference_matches_precomputed(setup, single_process_losses):
    live = copy.deepcopy(config(setup))
    live["reference"]["mode"] = "live"
    losses = logging_result(run_distributed(train, 1, live))["losses"]
    for step, (a, b) in enumerate(zip(losses, single_process_losses), start=1):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7), f"step {step}: {a} vs {b}"
