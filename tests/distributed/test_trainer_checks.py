"""What the trainer checks before it spends GPU hours, and paths a new user hits: a missing
starting checkpoint, a validation split made with another tokenizer, a record that cannot fit a
micro-batch, a resumed run whose schedule changed, evaluation with a live reference, and the
interleaved schedule when a step packs into fewer micro-batches than pipeline stages."""

import copy
import math

import pytest

from tests.distributed.trainer_common import (base_config, logging_result, make_dataset,
                                              prepare_starting_point, train, write_initial)
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
SIMPO = {"name": "simpo", "beta": 2.0, "gamma": 0.5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_checks")
    paths = make_dataset(root / "data", num_records=32)
    paths["init"] = str(root / "init")
    raw = base_config(paths, str(root))
    raw["data"]["valid_prefix"] = paths["valid"]
    run_distributed(prepare_starting_point, 1, raw, paths["init"])
    return paths, root


def train_error(raw: dict) -> str:
    """Rank function: the ValueError the trainer raises (set-up or training), '' if none."""
    try:
        train(raw, capture=True)
    except ValueError as err:
        return str(err)
    return ""


def dataset_with_another_tokenizer(tmp_path, name: str, count: int) -> str:
    """A dataset prefix tokenized with a SentencePiece model other than the run's."""
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess

    other = synthetic.train_sentencepiece_tokenizer(str(tmp_path / "tok"), vocab_size=150)
    records = synthetic.generate_records("kv_retrieval", count, seed=5, long_length=60)
    synthetic.write_jsonl(records, str(tmp_path / f"{name}.jsonl"))
    preprocess([str(tmp_path / f"{name}.jsonl")], str(tmp_path / name), "SentencePieceTokenizer",
               other)
    return str(tmp_path / name)


def test_missing_starting_checkpoint_is_an_error_not_a_random_init(setup, tmp_path):
    paths, root = setup
    raw = base_config(paths, str(root), objective=SIMPO, reference={"mode": "none"},
                      checkpoint={"load": str(tmp_path / "nope")})
    (message,) = run_distributed(train_error, 1, raw)
    assert f"checkpoint.load={tmp_path / 'nope'}: no checkpoint there" in message
    # load == save on a job's first run: a fresh start, not an error
    raw["checkpoint"] = {"load": str(tmp_path / "run"), "save": str(tmp_path / "run")}
    raw["training"]["train_iters"] = 2
    assert run_distributed(train_error, 1, raw) == [""]
    # ... but then the reference cannot default to checkpoint.load (it holds the trained model)
    raw = base_config(paths, str(root), checkpoint=dict(raw["checkpoint"]))
    raw["reference"].pop("checkpoint")
    (message,) = run_distributed(train_error, 1, raw)
    assert "needs the reference model's checkpoint: set reference.checkpoint" in message


def test_validation_split_from_another_tokenizer_is_refused(setup, tmp_path):
    paths, root = setup
    valid = dataset_with_another_tokenizer(tmp_path, "valid", 8)
    raw = base_config(paths, str(root), data={"valid_prefix": valid})
    (message,) = run_distributed(train_error, 1, raw)
    assert f"dataset {tmp_path / 'valid'} was tokenized with" in message


def test_validation_split_smaller_than_a_global_batch_is_refused_at_set_up(setup):
    paths, root = setup
    raw = base_config(paths, str(root), data={"valid_prefix": paths["valid"]},
                      training={"global_batch_size": 32})  # the valid split has 16 records
    (message,) = run_distributed(train_error, 1, raw)
    assert "has 16 records, fewer than one global batch" in message


def test_without_a_tokenizer_section_the_checkpoint_s_tokenizer_is_checked(setup, tmp_path):
    """The starting checkpoint recorded its tokenizer: a dataset made with another is refused
    even when the run config names none."""
    paths, root = setup
    raw = base_config(paths, str(root), objective=SIMPO, reference={"mode": "none"},
                      data={"train_prefix": dataset_with_another_tokenizer(tmp_path, "train", 16)})
    del raw["tokenizer"]
    (message,) = run_distributed(train_error, 1, raw)
    assert "was tokenized with" in message and paths["tokenizer"] in message


def test_a_record_over_the_budget_stops_the_run_at_set_up(setup):
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.roles import Role

    paths, root = setup
    sizes = PreferenceDataset(paths["train"]).group_sizes(
        [Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN], 2)
    budget = int(sizes.max()) - 2  # the largest record(s) do not fit, the others do
    over = int((sizes > budget).sum())
    # Unshared packing: the exact sizes are checked at set-up (with data.shared_prefix a lower
    # bound is; tests/unit/test_data_packing.py).
    raw = base_config(paths, str(root), data={"max_tokens_per_micro_batch": budget,
                                              "shared_prefix": False})
    (message,) = run_distributed(train_error, 1, raw)
    assert f"{over} record(s) of {paths['train']} do not fit one micro-batch" in message
    assert f"needs {int(sizes.max())} tokens" in message


def first_run_then(paths, root, tmp_path, iters: int):
    """Train ``iters`` steps into a save directory that is also the load directory; returns a
    function that resumes it with other sections (single rank, output captured)."""
    save = {"save": str(tmp_path / "run"), "load": str(tmp_path / "run")}
    run_distributed(train, 1, base_config(paths, str(root), training={"train_iters": iters},
                                          checkpoint=dict(save)))

    def resume(**sections):
        raw = base_config(paths, str(root), checkpoint=dict(save), **sections)
        return run_distributed(train, 1, raw, capture=True)[0]

    return resume


def test_resumed_run_follows_the_config_s_schedule_and_says_so(setup, tmp_path):
    paths, root = setup
    resume = first_run_then(paths, root, tmp_path, 3)
    resumed = resume(training={"train_iters": 5})
    assert "the schedule differs from the checkpoint's; following the config" in resumed["output"]
    assert "lr_decay_steps 3 -> 5" in resumed["output"]
    fresh = logging_result(run_distributed(train, 1, base_config(paths, str(root),
                                                                 training={"train_iters": 5})))
    assert [row["lr"] for row in resumed["history"]] == [row["lr"] for row in fresh["history"][3:]]


def test_evaluation_with_a_live_reference_matches_the_precomputed_one(setup):
    paths, root = setup
    sections = dict(training={"train_iters": 2, "eval_interval": 2, "eval_iters": 1},
                    data={"valid_prefix": paths["valid"]})
    precomputed = base_config(paths, str(root), **copy.deepcopy(sections))
    live = base_config(paths, str(root), reference={"mode": "live"}, **copy.deepcopy(sections))

    def evals(raw):
        history = logging_result(run_distributed(train, 2, raw))["history"]
        rows = [row for row in history if row.get("eval")]
        assert rows, history
        return rows[-1]

    expected, actual = evals(precomputed), evals(live)
    names = [name for name in expected if name.startswith("eval/")]
    assert "eval/short/rewards/margins" in names
    for name in names:
        assert math.isclose(actual[name], expected[name], rel_tol=1e-5, abs_tol=1e-6), name


def test_interleaved_schedule_splits_a_step_that_packs_into_one_micro_batch(setup, tmp_path):
    """PP=2 x VPP=2 needs >= 2 micro-batches per step; a budget that packs a rank's whole share
    into one is split, and the trajectory still equals one process's."""
    paths, root = setup
    four_layers = {"num_layers": 4}
    init = str(tmp_path / "init4")
    run_distributed(write_initial, 1, base_config(paths, str(root), model=four_layers), init)
    common = dict(model=four_layers, objective=SIMPO, reference={"mode": "none"},
                  checkpoint={"load": init},
                  data={"max_tokens_per_micro_batch": 8192, "fixed_length_micro_batches": True})
    single = logging_result(run_distributed(train, 1, base_config(paths, str(root),
                                                                  **copy.deepcopy(common))))
    interleaved = logging_result(run_distributed(train, 2, base_config(
        paths, str(root), parallel={"pipeline_model_parallel_size": 2,
                                    "virtual_pipeline_model_parallel_size": 2},
        **copy.deepcopy(common))))
    for a, b in zip(interleaved["losses"], single["losses"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("objective,mode", [(SIMPO, "precomputed"), ({"name": "sft"}, "live")])
def test_reference_free_objective_ignores_the_example_s_reference_mode(setup, tmp_path,
                                                                      objective, mode):
    paths, root = setup
    raw = base_config(paths, str(root), objective=objective, training={"train_iters": 2},
                      reference={"mode": mode, "cache": str(tmp_path / "no-such-cache.npz")})
    result = run_distributed(train, 1, raw, capture=True)[0]
    assert f"reference.mode={mode} ignored" in result["output"]
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])


def test_log_line_averages_over_the_log_interval(setup):
    """As Megatron's: with log_interval=2 the line at iteration 4 shows the mean of iterations 3
    and 4 (the first iteration is always printed on its own)."""
    import re

    paths, root = setup
    raw = base_config(paths, str(root), logging={"log_interval": 2})
    result = logging_result(run_distributed(train, 1, raw, capture=True))
    lines = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r" iteration +(\d+)/ +\d+ \|.*? loss: ([-+0-9.E]+) \|", result["output"])}
    assert sorted(lines) == [1, 2, 4]
    losses = result["losses"]
    assert math.isclose(lines[1], losses[0], rel_tol=1e-6)
    assert math.isclose(lines[2], losses[1], rel_tol=1e-6)
    assert math.isclose(lines[4], (losses[2] + losses[3]) / 2, rel_tol=1e-6)


def test_saved_run_config_records_the_tokenizer_the_run_used(setup, tmp_path):
    """Even when the config leaves it to the starting checkpoint: the next run (and
    megatron-to-hf) read it from there."""
    import os

    import yaml

    paths, root = setup
    raw = base_config(paths, str(root), training={"train_iters": 2},
                      checkpoint={"save": str(tmp_path / "run")})
    del raw["tokenizer"]
    run_distributed(train, 1, raw)
    saved = yaml.safe_load((tmp_path / "run" / "iter_0000002" / "run_config.yaml").read_text())
    assert saved["tokenizer"] == {"tokenizer_type": "SentencePieceTokenizer",
                                  "tokenizer_model": os.path.abspath(paths["tokenizer"])}


def test_unwritable_save_directory_stops_the_run_at_set_up(setup, tmp_path):
    """A save path that cannot be created (here under a regular file: fails even as root) is
    refused before the first step, not at the first save."""
    paths, root = setup
    (tmp_path / "a-file").write_text("")
    save = tmp_path / "a-file" / "run"
    raw = base_config(paths, str(root), checkpoint={"save": str(save)})
    (message,) = run_distributed(train_error, 1, raw)
    assert f"checkpoint.save={save} cannot be created: {tmp_path / 'a-file'} is a file" in message


def test_resume_notes_a_finished_run_and_a_changed_data_order(setup, tmp_path):
    paths, root = setup
    resume = first_run_then(paths, root, tmp_path, 2)
    again = resume(training={"train_iters": 2})
    assert "nothing to train: the checkpoint is at iteration 2, training.train_iters=2" in \
        again["output"] and again["losses"] == []
    reseeded = resume(training={"train_iters": 3, "seed": 99})
    assert "warning: resuming with training.seed 7 -> 99" in reseeded["output"]
