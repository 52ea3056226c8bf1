"""The trainer end to end on gloo ranks: parallel layouts give the single-process loss
trajectory, stop/resume is exact, resume under another TP loads, metrics reach the log and
TensorBoard, NaN steps are skipped, live and precomputed references agree."""

import copy
import math

import pytest

from tests.distributed.trainer_common import (base_config, logging_result, make_dataset,
                                              prepare_starting_point, train)
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    paths = make_dataset(root / "data")
    paths["init"] = str(root / "init")
    raw = base_config(paths, str(root))
    raw["data"]["valid_prefix"] = paths["valid"]
    run_distributed(prepare_starting_point, 1, raw, paths["init"])
    return paths, root


def assert_trajectories_close(actual, expected, rtol=1e-5):
    assert len(actual) == len(expected) > 0
    for step, (a, b) in enumerate(zip(actual, expected), start=1):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-7), f"step {step}: {a} vs {b}"


# Trajectory parity needs objectives whose gradient is a smooth function of the log-probs at the
# start. SoLoPO with a DPO base is not: its SoLo-RA gap |r_S - r_L| is exactly 0 when the policy
# equals the reference, so the sign of |.|'s gradient at step 1 is decided by rounding, which
# differs between layouts (docs/objectives.md). LongPO exercises the precomputed reference,
# SoLoPO-SimPO the SoLo-RA path.
TRAJECTORY_OBJECTIVES = {
    "longpo": {"name": "longpo", "beta": 0.5, "lambda": 1.0},
    "solopo_simpo": {"name": "solopo", "base": "simpo", "beta": 2.0, "gamma": 0.5, "alpha": 1.0},
}


@pytest.fixture(scope="module")
def single_process_losses(setup):
    paths, root = setup
    return {name: logging_result(run_distributed(
        train, 1, base_config(paths, str(root), objective=objective)))["losses"]
        for name, objective in TRAJECTORY_OBJECTIVES.items()}


@pytest.mark.parametrize("objective", list(TRAJECTORY_OBJECTIVES))
@pytest.mark.parametrize("layout", [
    dict(tensor_model_parallel_size=2),
    dict(tensor_model_parallel_size=2, sequence_parallel=True),
    dict(pipeline_model_parallel_size=2),
    dict(),  # DP=2
    dict(context_parallel_size=2),
], ids=["tp2", "tp2_sp", "pp2", "dp2", "cp2"])
def test_layout_loss_trajectory_matches_single_process(setup, single_process_losses, layout,
                                                       objective):
    paths, root = setup
    raw = base_config(paths, str(root), parallel=layout,
                      objective=TRAJECTORY_OBJECTIVES[objective])
    losses = logging_result(run_distributed(train, 2, raw))["losses"]
    assert_trajectories_close(losses, single_process_losses[objective])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("sections", [
    {},
    # The distributed optimizer's state is sharded over DP (dp_reshardable format), and over TP
    # with TP=2; the resumed run must get every shard back.
    {"optimizer": {"use_distributed_optimizer": True}, "ddp": {"overlap_grad_reduce": True}},
    {"optimizer": {"use_distributed_optimizer": True},
     "parallel": {"tensor_model_parallel_size": 2}},
], ids=["adam_dp2", "distopt_dp2", "distopt_tp2"])
def test_stop_and_resume_matches_uninterrupted_run(setup, tmp_path, sections):
    paths, root = setup

    def config(**more):
        raw = base_config(paths, str(root), **more)
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw

    uninterrupted = logging_result(run_distributed(train, 2, config(training={"train_iters": 6})))
    first = config(training={"train_iters": 3}, checkpoint={"save": str(tmp_path / "run")},
                   scheduler={"lr_decay_iters": 6})
    run_distributed(train, 2, first)
    # Requeued job: load == save, same total length.
    second = config(training={"train_iters": 6},
                    checkpoint={"save": str(tmp_path / "run"), "load": str(tmp_path / "run")},
                    scheduler={"lr_decay_iters": 6})
    resumed = logging_result(run_distributed(train, 2, second, capture=True))
    assert "optimizer state was not restored" not in resumed["output"]
    assert [row["iteration"] for row in resumed["history"]] == [4, 5, 6]
    assert resumed["losses"] == uninterrupted["losses"][3:]  # bit for bit
    # Adam's moments came back too: the grad norms after the restart match as well.
    norms = [row["grad_norm"] for row in uninterrupted["history"] if "grad_norm" in row]
    assert [row["grad_norm"] for row in resumed["history"] if "grad_norm" in row] == norms[3:]


def test_resume_under_a_different_tensor_parallel_size(setup, tmp_path):
    paths, root = setup
    full = base_config(paths, str(root), training={"train_iters": 3})
    uninterrupted = logging_result(run_distributed(train, 1, full))["losses"]
    first = base_config(paths, str(root), training={"train_iters": 2},
                        checkpoint={"save": str(tmp_path / "run")}, scheduler={"lr_decay_iters": 3})
    run_distributed(train, 1, first)
    second = base_config(paths, str(root), training={"train_iters": 3},
                         parallel={"tensor_model_parallel_size": 2},
                         checkpoint={"load": str(tmp_path / "run")}, scheduler={"lr_decay_iters": 3})
    results = run_distributed(train, 2, second, capture=True)
    resumed = logging_result(results)
    # Weights loaded under TP=2: the first resumed forward gives the uninterrupted loss.
    assert math.isclose(resumed["losses"][0], uninterrupted[2], rel_tol=1e-5)
    assert "optimizer state was not restored (parallel layout changed" in results[0]["output"]


def test_metrics_reach_the_log_line_and_tensorboard(setup, tmp_path):
    paths, root = setup
    raw = base_config(paths, str(root), training={"train_iters": 2, "eval_interval": 2},
                      logging={"tensorboard_dir": str(tmp_path / "tb")})
    raw["data"]["valid_prefix"] = paths["valid"]
    result = logging_result(run_distributed(train, 2, raw, capture=True))
    line = next(l for l in result["output"].splitlines() if l.startswith(" iteration        1/"))
    for field in ("consumed samples:", "elapsed time per iteration (ms):",
                  "throughput per GPU (TFLOP/s/GPU):", "tokens/s/GPU:", "learning rate:",
                  "global batch size:", "loss:", "short/rewards/accuracies:", "short/rewards/margins:",
                  "solo_ra/gap:", "grad norm:", "number of skipped iterations:"):
        assert field in line, field
    assert "[memory after first iteration]" in result["output"]
    assert "validation at iteration 2" in result["output"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/short/rewards/accuracies", "train/solo_ra/gap",
                "train/learning_rate", "train/grad_norm", "eval/short/rewards/accuracies"):
        assert tag in tags, tag


class NanAtSteps:
    """Makes the objective's loss NaN at the given (1-based) iterations (picklable for ranks)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def __call__(self, trainer):
        original = trainer.objective.group_losses
        steps = self.steps

        def group_losses(inputs):
            losses, metrics = original(inputs)
            if trainer.iteration + 1 in steps:
                losses = losses * float("nan")
            return losses, metrics

        trainer.objective.group_losses = group_losses


def test_nan_step_is_skipped_and_counted(setup):
    paths, root = setup
    raw = base_config(paths, str(root), training={"train_iters": 3})
    result = logging_result(run_distributed(train, 2, raw, patch=NanAtSteps({2})))
    assert result["num_skipped"] == 1
    skipped = [row["skipped"] for row in result["history"]]
    assert skipped == [False, True, False]
    assert math.isfinite(result["losses"][2])


def test_consecutive_nan_steps_stop_the_run(setup):
    paths, root = setup
    raw = base_config(paths, str(root), training={"train_iters": 5, "max_consecutive_skipped_steps": 2})
    with pytest.raises(pytest.fail.Exception, match="2 consecutive steps had a NaN/Inf"):
        run_distributed(train, 1, raw, patch=NanAtSteps({2, 3}))


@pytest.mark.parametrize("objective", [
    {"name": "solopo", "base": "dpo", "beta": 0.5, "alpha": 1.0},
    {"name": "longpo", "beta": 0.5, "lambda": 0.5},
])
def test_live_reference_matches_precomputed(setup, objective):
    paths, root = setup
    precomputed = base_config(paths, str(root), objective=objective)
    live = copy.deepcopy(precomputed)
    live["reference"]["mode"] = "live"
    live_losses = logging_result(run_distributed(train, 2, live))["losses"]
    if objective["name"] == "solopo":
        precomputed_losses = logging_result(run_distributed(train, 2, precomputed))["losses"]
        assert_trajectories_close(live_losses, precomputed_losses, rtol=1e-6)
    assert all(math.isfinite(x) for x in live_losses) and live_losses[-1] < live_losses[0]


@pytest.mark.parametrize("name,sections", [
    ("distributed_optimizer_dp2", dict(optimizer={"use_distributed_optimizer": True},
                                       ddp={"overlap_grad_reduce": True})),
    ("full_recompute_tp2", dict(parallel={"tensor_model_parallel_size": 2},
                                model={"transformer_overrides": {
                                    "recompute_granularity": "full", "recompute_method": "uniform",
                                    "recompute_num_layers": 1}})),
])
def test_distributed_optimizer_and_recompute_keep_the_trajectory(setup, single_process_losses,
                                                                  name, sections):
    paths, root = setup
    raw = base_config(paths, str(root), objective=TRAJECTORY_OBJECTIVES["longpo"])
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    losses = logging_result(run_distributed(train, 2, raw))["losses"]
    assert_trajectories_close(losses, single_process_losses["longpo"])


def test_bf16_training_runs_and_learns(setup):
    paths, root = setup
    raw = base_config(paths, str(root), precision={"bf16": True}, training={"train_iters": 6},
                      objective=TRAJECTORY_OBJECTIVES["solopo_simpo"],
                      parallel={"tensor_model_parallel_size": 2})
    result = logging_result(run_distributed(train, 2, raw))
    assert all(math.isfinite(x) for x in result["losses"]) and result["num_skipped"] == 0
    assert result["losses"][-1] < result["losses"][0]


def test_stale_reference_cache_is_refused(setup, tmp_path):
    """A cache computed from another checkpoint than the run's reference is refused by name."""
    paths, root = setup
    other = tmp_path / "other_init"
    raw = base_config(paths, str(root), training={"seed": 11})
    raw["reference"]["checkpoint"] = str(other)
    from tests.distributed.trainer_common import write_initial
    run_distributed(write_initial, 1, raw, str(other))
    # Another reference has caches of its own (keyed by its path): none computed yet.
    with pytest.raises(pytest.fail.Exception, match=r"reference cache \S+\.reference-\w+\.npz "
                                                    r"does not exist"):
        run_distributed(train, 1, raw)
    # The first reference's cache named explicitly: refused as stale.
    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.reference import run_cache_path

    raw["reference"]["cache"] = run_cache_path(config_from_dict(base_config(paths, str(root))),
                                               paths["train"])
    with pytest.raises(pytest.fail.Exception, match="is stale: it was computed from checkpoint"):
        run_distributed(train, 1, raw)


def test_restarted_job_resumes_from_its_save_directory(setup, tmp_path):
    """checkpoint.load is the converted starting point; once checkpoint.save holds a checkpoint,
    the same config resumes from it."""
    paths, root = setup
    full = logging_result(run_distributed(train, 1, base_config(
        paths, str(root), training={"train_iters": 4})))["losses"]
    first = base_config(paths, str(root), training={"train_iters": 2},
                        checkpoint={"save": str(tmp_path / "run")}, scheduler={"lr_decay_iters": 4})
    run_distributed(train, 1, first)
    again = base_config(paths, str(root), training={"train_iters": 4},
                        checkpoint={"save": str(tmp_path / "run")}, scheduler={"lr_decay_iters": 4})
    resumed = logging_result(run_distributed(train, 1, again))
    assert resumed["losses"] == full[2:]
