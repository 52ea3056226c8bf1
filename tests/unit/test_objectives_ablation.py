"""The ablation options: LongPO's ``nll_weight`` and SoLo-RA's ``solo_ra_huber_delta``, against
float64 formulas written here."""

import math

import pytest
import torch

from megatron_solopo.objectives import ObjectiveInputs, RoleLogps, build_objective
from megatron_solopo.roles import Role

LC, LR, SC, SR = (Role.parse(name) for name in ("long/chosen", "long/rejected", "short/chosen",
                                                "short/rejected"))


def _inputs(objective, groups=5, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)

    def values(low=-40.0, high=-1.0):
        tensor = low + (high - low) * torch.rand(groups, generator=generator, dtype=torch.float64)
        return tensor.requires_grad_(requires_grad)

    policy = {}
    for role in objective.policy_roles:
        policy[role] = RoleLogps(values(), torch.randint(3, 20, (groups,), generator=generator),
                                 values(-400.0, -50.0),
                                 torch.randint(60, 200, (groups,), generator=generator))
    reference = {role: values() for role in objective.reference_roles}
    return ObjectiveInputs(policy=policy, reference=reference, num_groups=float(groups))


@pytest.mark.parametrize("nll_weight", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("include_context", [True, False])
def test_longpo_nll_weight(nll_weight, include_context):
    objective = build_objective("longpo", beta=0.1, **{"lambda": 0.3},
                                nll_weight=nll_weight, nll_include_context=include_context)
    inputs = _inputs(objective)
    loss, metrics = objective(inputs)
    chosen, rejected = inputs.policy[LC], inputs.policy[LR]
    if include_context:
        nll = -chosen.sequence_logps / chosen.sequence_num_tokens
    else:
        nll = -chosen.logps / chosen.num_tokens
    margin = 0.1 * ((chosen.logps - inputs.reference[SC]) - (rejected.logps - inputs.reference[SR]))
    preference = -torch.nn.functional.logsigmoid(margin)
    expected = (nll_weight * nll + 0.3 * preference).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-12)
    # the metrics do not depend on the weight: "nll" is reported even when it is not trained
    assert math.isclose(metrics["nll"].item(), nll.mean().item(), rel_tol=1e-12)
    assert math.isclose(metrics["longpo/preference_loss"].item(), preference.mean().item(),
                        rel_tol=1e-12)


def test_longpo_nll_weight_default_is_the_paper_loss():
    objective = build_objective("longpo")
    assert objective.params.nll_weight == 1.0
    explicit = build_objective("longpo", nll_weight=1)
    inputs = _inputs(objective, seed=3)
    assert objective(inputs)[0].item() == explicit(inputs)[0].item()


def test_longpo_without_nll_has_no_gradient_from_the_context_tokens():
    objective = build_objective("longpo", nll_weight=0.0)
    inputs = _inputs(objective, requires_grad=True)
    loss, _ = objective(inputs)
    loss.backward()
    assert inputs.policy[LC].sequence_logps.grad is None or \
        torch.all(inputs.policy[LC].sequence_logps.grad == 0)
    assert torch.all(inputs.policy[LC].logps.grad != 0)


@pytest.mark.parametrize("name, kwargs, message", [
    ("longpo", {"nll_weight": -1.0}, "nll_weight must be >= 0"),
    ("longpo", {"nll_weight": float("nan")}, "nll_weight"),
    ("solopo", {"base": "dpo", "solo_ra_huber_delta": -0.1}, "solo_ra_huber_delta must be >= 0"),
])
def test_invalid_values(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_objective(name, **kwargs)


def _solopo_parts(objective, inputs):
    """(short reward of chosen, long reward of chosen, po loss) in float64, DPO base."""
    beta = objective.base.params.beta
    policy, reference = inputs.policy, inputs.reference
    short = beta * (policy[SC].logps - reference[SC])
    long = beta * (policy[LC].logps - reference[LC])
    margin = short - beta * (policy[SR].logps - reference[SR])
    return short, long, -torch.nn.functional.logsigmoid(margin)


@pytest.mark.parametrize("delta", [0.0, 0.05, 1.0, 50.0])
def test_solo_ra_huber(delta):
    objective = build_objective("solopo", base="dpo", alpha=2.0, solo_ra_huber_delta=delta)
    inputs = _inputs(objective, seed=7)
    loss, metrics = objective(inputs)
    short, long, po = _solopo_parts(objective, inputs)
    gap = (short - long).abs()
    if delta == 0:
        penalty = gap
    else:
        penalty = torch.where(gap < delta, gap ** 2 / (2 * delta), gap - delta / 2)
    assert math.isclose(loss.item(), (po + 2.0 * penalty).mean().item(), rel_tol=1e-12)
    # the reported gap is |gap| whatever the penalty
    assert math.isclose(metrics["solo_ra/gap"].item(), gap.mean().item(), rel_tol=1e-12)
    assert math.isclose(metrics["solo_ra/loss"].item(), (2.0 * penalty).mean().item(), rel_tol=1e-12)


def test_solo_ra_default_is_the_absolute_gap():
    default = build_objective("solopo", base="dpo")
    assert default.params.solo_ra_huber_delta == 0.0
    explicit = build_objective("solopo", base="dpo", solo_ra_huber_delta=0)
    inputs = _inputs(default, seed=11)
    assert default(inputs)[0].item() == explicit(inputs)[0].item()


def _first_step_gradient(delta, rounding):
    """d loss / d logp_pi(y_w|x_L) at policy == reference, with the reference of the long chosen
    off by ``rounding`` (what a precomputed cache can differ by)."""
    objective = build_objective("solopo", base="dpo", alpha=3.0, solo_ra_huber_delta=delta)
    values = {role: torch.tensor([-12.5], dtype=torch.float64) for role in (SC, SR, LC)}
    policy = {role: RoleLogps(values[role].clone().requires_grad_(True), torch.tensor([5]))
              for role in (SC, SR, LC)}
    reference = {role: values[role].clone() for role in (SC, SR, LC)}
    reference[LC] = reference[LC] + rounding
    loss, _ = objective(ObjectiveInputs(policy=policy, reference=reference, num_groups=1.0))
    loss.backward()
    return policy[LC].logps.grad.item()


def test_first_step_sign_flip_with_abs_and_none_with_huber():
    # |.|: a rounding difference of +-1e-6 in the reference decides the sign of a full-size
    # gradient (alpha * beta = 0.3); exactly equal values give 0.
    up, down = _first_step_gradient(0.0, 1e-6), _first_step_gradient(0.0, -1e-6)
    assert math.isclose(abs(up), 0.3, rel_tol=1e-9) and math.isclose(up, -down, rel_tol=1e-9)
    assert _first_step_gradient(0.0, 0.0) == 0.0
    # Huber: the same rounding gives a gradient of size alpha * beta * beta * 1e-6 / delta.
    for rounding in (1e-6, -1e-6, 0.0):
        assert abs(_first_step_gradient(0.05, rounding)) < 1e-5
