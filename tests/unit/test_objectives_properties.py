"""Objectives: float64 gradcheck, ORPO's log-odds stability, micro-batch additivity of the loss and
every metric, precision, input validation, registry errors and the package's import hygiene."""

import ast
import math
from pathlib import Path

import pytest
import torch

import megatron_solopo.objectives as objectives_pkg
from megatron_solopo.objectives import OBJECTIVES, Objective, RoleLogps, build_objective
from megatron_solopo.roles import Role
from tests.unit.test_objectives import CONFIGS, G, SC, SR, config_id, random_inputs, run

IDS = [config_id(c) for c in CONFIGS]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_gradcheck_float64(name, kw):
    objective = build_objective(name, **kw)
    policy, reference = random_inputs(10, requires_grad=True, groups=3)
    roles = list(objective.policy_roles)
    leaves = [policy[r].logps for r in roles] + [policy[r].sequence_logps for r in roles]

    def loss_of(*tensors):
        patched = {role: RoleLogps(tensors[i], policy[role].num_tokens, tensors[len(roles) + i],
                                   policy[role].sequence_num_tokens)
                   for i, role in enumerate(roles)}
        return run(objective, patched, reference, num_groups=3)[0]

    assert torch.autograd.gradcheck(loss_of, tuple(leaves), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# ORPO log-odds
# ---------------------------------------------------------------------------------------------
AVERAGES = [0.0, -1e-45, -1e-30, -1e-12, -1e-7, -1e-3, -0.5, -20.0, -1e3, -1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kw", [("orpo", {}), ("solopo", {"base": "orpo", "solo_ra": "both"})])
def test_orpo_is_finite_for_average_logps_near_zero_and_very_negative(name, kw, dtype):
    objective = build_objective(name, **kw)
    for chosen in AVERAGES:
        for rejected in AVERAGES:
            policy = {}
            for role, average in ((SC, chosen), (SR, rejected), (Role.LONG_CHOSEN, rejected),
                                  (Role.LONG_REJECTED, chosen)):
                tokens = torch.full((2,), 7.0, dtype=dtype)
                policy[role] = RoleLogps((tokens * average).requires_grad_(True), tokens)
            loss, metrics = run(objective, policy, {}, num_groups=2)
            loss.backward()
            assert loss.dtype == dtype and torch.isfinite(loss), (chosen, rejected)
            assert all(torch.isfinite(v) for v in metrics.values()), (chosen, rejected)
            for role in objective.policy_roles:
                assert torch.isfinite(policy[role].logps.grad).all(), (chosen, rejected)


@pytest.mark.parametrize("average", [-1e-12, -1e-9, -1e-7, -1e-5, -0.01, -1.0, -30.0, -1e4])
def test_orpo_log_odds_are_accurate_in_fp32(average):
    """The reward metric is the log-odds; in fp32 ``log(1 - exp(a))`` would be off by about 1%
    at a = -1e-7 and infinite above -3e-8. Exact value from python floats (float64)."""
    a32 = float(torch.tensor(average, dtype=torch.float32))
    exact = a32 - math.log(-math.expm1(a32))
    tokens = torch.ones(1)
    policy = {SC: RoleLogps(torch.tensor([a32]), tokens), SR: RoleLogps(torch.tensor([-1.0]), tokens)}
    _, metrics = run(build_objective("orpo"), policy, {}, num_groups=1)
    assert math.isclose(metrics["short/rewards/chosen"].item(), exact, rel_tol=2e-6, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Normalization by the global group count
# ---------------------------------------------------------------------------------------------
def _slice(policy, reference, part):
    sub_policy = {r: RoleLogps(v.logps[part], v.num_tokens[part], v.sequence_logps[part],
                               v.sequence_num_tokens[part]) for r, v in policy.items()}
    return sub_policy, {r: v[part] for r, v in reference.items()}


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_micro_batch_losses_and_metrics_add_up_to_the_full_batch(name, kw):
    objective = build_objective(name, **kw)
    policy, reference = random_inputs(11, requires_grad=True)
    full_loss, full_metrics = run(objective, policy, reference, num_groups=G)
    full_grads = torch.autograd.grad(full_loss, [v.logps for v in policy.values()], allow_unused=True)
    total_loss, totals = 0.0, {}
    for part in (slice(0, 1), slice(1, 4), slice(4, 4), slice(4, 6)):  # an empty one too
        loss, metrics = run(objective, *_slice(policy, reference, part),
                            num_groups=torch.tensor(float(G), dtype=torch.float64))
        total_loss = total_loss + loss
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
    torch.testing.assert_close(total_loss, full_loss, rtol=1e-12, atol=1e-12)
    split_grads = torch.autograd.grad(total_loss, [v.logps for v in policy.values()],
                                      allow_unused=True)
    for full, split in zip(full_grads, split_grads):
        assert (full is None) == (split is None)
        if full is not None:
            torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)
    assert sorted(totals) == sorted(full_metrics)
    for key in full_metrics:
        torch.testing.assert_close(totals[key], full_metrics[key], rtol=1e-12, atol=1e-12,
                                   msg=key)


def test_data_parallel_ranks_add_up_like_micro_batches():
    """Two ranks, each with two micro-batches, num_groups = the global count."""
    objective = build_objective("solopo", base="dpo", solo_ra="both")
    policy, reference = random_inputs(16, groups=8)
    full_loss, full_metrics = run(objective, policy, reference, num_groups=8)
    parts = [slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 8)]
    outputs = [run(objective, *_slice(policy, reference, p), num_groups=8) for p in parts]
    assert math.isclose(sum(o[0].item() for o in outputs), full_loss.item(), rel_tol=1e-12)
    for key, value in full_metrics.items():
        assert math.isclose(sum(o[1][key].item() for o in outputs), value.item(), rel_tol=1e-12,
                            abs_tol=1e-12), key


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", [("simpo", {}), ("dpo", {}), ("longpo", {}),
                                     ("solopo", {"base": "orpo", "solo_ra": "both"})])
def test_low_precision_inputs_are_computed_in_fp32(name, kw, low):
    policy, reference = random_inputs(12)
    low_policy = {r: RoleLogps(v.logps.to(low), v.num_tokens.to(low), v.sequence_logps.to(low),
                               v.sequence_num_tokens.to(low)) for r, v in policy.items()}
    low_reference = {r: v.to(low) for r, v in reference.items()}
    loss, metrics = run(build_objective(name, **kw), low_policy, low_reference)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in metrics.values())


def test_integer_token_counts_are_accepted():
    policy, _ = random_inputs(17)
    as_int = {r: RoleLogps(v.logps.float(), v.num_tokens.long()) for r, v in policy.items()}
    loss, _ = run(build_objective("simpo"), as_int, {})
    expected, _ = run(build_objective("simpo"), {r: RoleLogps(v.logps.float(), v.num_tokens.float())
                                                 for r, v in policy.items()}, {})
    assert loss.dtype == torch.float32 and loss.item() == expected.item()


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------
def test_missing_roles_are_named():
    policy, reference = random_inputs(13, roles=(SC, SR))
    with pytest.raises(ValueError, match="'solopo' needs policy log-probs for role long/chosen"):
        run(build_objective("solopo", base="simpo"), policy, reference)
    del reference[SR]
    with pytest.raises(ValueError, match="'dpo' needs reference log-probs for role short/rejected"):
        run(build_objective("dpo"), policy, reference)


def test_missing_sequence_logps_for_longpo_nll_is_named():
    policy, reference = random_inputs(18)
    policy[Role.LONG_CHOSEN].sequence_logps = None
    with pytest.raises(ValueError, match="whole-sequence log-probs .* long/chosen"):
        run(build_objective("longpo"), policy, reference)
    run(build_objective("longpo", nll_include_context=False), policy, reference)  # not needed


def test_shape_mismatch_and_bad_num_groups_are_refused():
    policy, reference = random_inputs(19)
    reference[SR] = reference[SR][:4]
    with pytest.raises(ValueError, match=r"shape \[G\].*reference short/rejected has \[4\]"):
        run(build_objective("dpo"), policy, reference)
    policy, reference = random_inputs(19)
    for bad in (0, -2.0):
        with pytest.raises(ValueError, match="num_groups .* must be > 0"):
            run(build_objective("dpo"), policy, reference, num_groups=bad)
    with pytest.raises(ValueError, match="num_groups must be a scalar"):
        run(build_objective("dpo"), policy, reference, num_groups=torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
def test_every_registered_name_builds_and_describes_itself():
    assert OBJECTIVES == ("dpo", "simpo", "orpo", "sft", "solopo", "longpo", "long_dpo")
    for name in OBJECTIVES:
        objective = build_objective(name, **({"base": "dpo"} if name == "solopo" else {}))
        assert isinstance(objective, Objective) and objective.name == name
        line = objective.describe()
        assert line.startswith(name) and "\n" not in line and line.isascii()
    assert "base=dpo(beta=0.1" in build_objective("solopo", base="dpo").describe()


def test_nested_and_flat_base_hyperparameters_are_the_same():
    flat = build_objective("solopo", base="orpo", alpha=2, **{"lambda": 0.3})
    nested = build_objective("solopo", base={"name": "orpo", "lambda": 0.3}, alpha=2)
    assert flat.base.params == nested.base.params and flat.params == nested.params
    assert nested.base.params.odds_ratio_weight == 0.3


def test_config_values_are_coerced():
    """YAML 1.1 reads 1e-2 as a string and 3 as an int."""
    assert build_objective("longpo", beta="1e-2").params.beta == 0.01
    params = build_objective("solopo", base="dpo", alpha=3).params
    assert params.alpha == 3.0 and isinstance(params.alpha, float)


@pytest.mark.parametrize("name,kw,message", [
    ("dpx", {}, "unknown objective 'dpx'; valid objectives: dpo, simpo, orpo, sft, solopo, longpo, long_dpo"),
    ("solopo", {}, "needs base=<one of dpo, simpo, orpo>"),
    ("solopo", {"base": {"beta": 0.1}}, "needs base=<one of dpo, simpo, orpo>"),
    ("solopo", {"base": "sft"}, "base='sft' is not a pairwise preference loss; valid bases: dpo, simpo, orpo"),
    ("solopo", {"base": "longpo"}, "valid bases: dpo, simpo, orpo"),
    ("dpo", {"beta": 0.0}, "beta must be > 0, got 0.0"),
    ("dpo", {"beta": -1.0}, "beta must be > 0"),
    ("simpo", {"beta": 0}, "beta must be > 0"),
    ("longpo", {"beta": -0.1}, "beta must be > 0"),
    ("solopo", {"base": "dpo", "beta": 0.0}, "beta must be > 0"),
    ("dpo", {"beta": "abc"}, "beta must be a number, got 'abc'"),
    ("dpo", {"beta": float("nan")}, "beta must be finite"),
    ("dpo", {"beta": True}, "beta must be a number"),
    ("solopo", {"base": "dpo", "alpha": -0.5}, "alpha must be >= 0"),
    ("solopo", {"base": "dpo", "solo_ra": "all"}, "solo_ra='all' is not valid; valid: chosen, both"),
    ("solopo", {"base": "dpo", "solo_ra_reference": "medium"}, "valid: long, short"),
    ("solopo", {"base": "simpo", "lambda": 1.0},
     "unknown hyper-parameter(s) lambda; valid: base, alpha, solo_ra, solo_ra_reference, solo_ra_huber_delta, beta, gamma"),
    ("solopo", {"base": {"name": "dpo", "gamma": 1.0}}, "unknown hyper-parameter(s) gamma; valid: name, beta, loss_type, label_smoothing"),
    ("solopo", {"base": {"name": "dpo", "beta": 0.2}, "beta": 0.3}, "beta given both at the top level and inside base"),
    ("solopo", {"base": "dpo", "context": "long"}, "unknown hyper-parameter(s) context"),
    ("dpo", {"label_smoothing": 0.6}, "label_smoothing must be in [0, 0.5)"),
    ("dpo", {"label_smoothing": -0.1}, "label_smoothing must be in [0, 0.5)"),
    ("dpo", {"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to loss_type=sigmoid only"),
    ("dpo", {"loss_type": "hinge"}, "valid: sigmoid, ipo"),
    ("dpo", {"gamma": 1.0}, "unknown hyper-parameter(s) gamma; valid: beta, loss_type, label_smoothing, context"),
    ("dpo", {"lambda": 1.0}, "unknown hyper-parameter(s) lambda; valid: beta, loss_type, label_smoothing, context"),
    ("dpo", {"context": "medium"}, "context='medium' is not valid; valid: short, long"),
    ("long_dpo", {"context": "short"}, "for DPO on the short context use name: dpo"),
    ("simpo", {"gamma": -1.0}, "gamma must be >= 0"),
    ("orpo", {"lambda": -1.0}, "odds_ratio_weight (lambda) must be >= 0"),
    ("orpo", {"lambda": 0.1, "odds_ratio_weight": 0.2}, "give lambda or odds_ratio_weight"),
    ("longpo", {"lambda": -1.0}, "preference_weight (lambda) must be >= 0"),
    ("longpo", {"nll_include_context": "yes"}, "nll_include_context must be true or false"),
    ("longpo", {"alpha": 1.0}, "valid: beta, preference_weight, nll_include_context, nll_weight, lambda"),
    ("sft", {"context": "medium"}, "valid: short, long"),
    ("sft", {"beta": 0.1}, "unknown hyper-parameter(s) beta; valid: context"),
])
def test_invalid_configuration_messages(name, kw, message):
    with pytest.raises(ValueError) as err:
        build_objective(name, **kw)
    assert message in str(err.value)


def test_package_has_no_distributed_or_megatron_imports():
    for path in Path(objectives_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for module in names:
                assert not module.startswith(("torch.distributed", "megatron.", "megatron_solopo.training",
                                              "megatron_solopo.parallel")), (path.name, module)
                assert module != "megatron", path.name
        assert "torch.distributed" not in path.read_text(), path.name
