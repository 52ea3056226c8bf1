"""Objectives against independent float64 re-implementations written here (1e-10), known values,
gradcheck, ORPO stability, micro-batch additivity and registry errors."""

import math

import pytest
import torch

from megatron_solopo.objectives import OBJECTIVES, ObjectiveInputs, RoleLogps, build_objective
from megatron_solopo.roles import ALL_ROLES, Role

G = 6  # groups in these tests
TOL = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Independent references: plain math on python floats, per group.
# ---------------------------------------------------------------------------------------------
def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_odds(a):
    return a - math.log(1.0 - math.exp(a))


def ref_dpo(pc, pr, rc, rr, nc, nr, beta, loss_type="sigmoid", eps=0.0):
    if loss_type == "ipo":
        logits = (pc - rc) / nc - (pr - rr) / nr
        return (logits - 1 / (2 * beta)) ** 2, beta * (pc - rc) / nc, beta * (pr - rr) / nr
    logits = (pc - rc) - (pr - rr)
    loss = -(1 - eps) * log_sigmoid(beta * logits) - eps * log_sigmoid(-beta * logits)
    return loss, beta * (pc - rc), beta * (pr - rr)


def ref_simpo(pc, pr, nc, nr, beta, gamma):
    rw, rl = beta * pc / nc, beta * pr / nr
    return -log_sigmoid(rw - rl - gamma), rw, rl


def ref_orpo(pc, pr, nc, nr, lam):
    lw, ll = log_odds(pc / nc), log_odds(pr / nr)
    return -pc / nc - lam * log_sigmoid(lw - ll), lw, ll


def random_inputs(seed, roles=ALL_ROLES, requires_grad=False, with_sequence=True):
    gen = torch.Generator().manual_seed(seed)
    policy, reference = {}, {}
    for role in roles:
        tokens = torch.randint(3, 40, (G,), generator=gen).double()
        # average log-probs in [-3, -0.05]: realistic and inside ORPO's domain
        logps = -(torch.rand(G, generator=gen, dtype=torch.float64) * 2.95 + 0.05) * tokens
        seq_tokens = tokens + torch.randint(5, 200, (G,), generator=gen).double()
        seq_logps = logps - torch.rand(G, generator=gen, dtype=torch.float64) * seq_tokens
        policy[role] = RoleLogps(logps.clone().requires_grad_(requires_grad), tokens,
                                 seq_logps.clone().requires_grad_(requires_grad) if with_sequence else None,
                                 seq_tokens if with_sequence else None)
        reference[role] = logps.detach() + torch.randn(G, generator=gen, dtype=torch.float64)
    return policy, reference


def val(policy, role, g):
    return float(policy[role].logps[g])


def n(policy, role, g):
    return float(policy[role].num_tokens[g])


def run(objective, policy, reference, num_groups=G):
    return objective(ObjectiveInputs(policy=policy, reference=reference, num_groups=num_groups))


def expected_mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# Base objectives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
@pytest.mark.parametrize("name,context", [("dpo", "short"), ("long_dpo", "long")])
def test_dpo_matches_reference(name, context, loss_type, eps):
    beta = 0.3
    policy, reference = random_inputs(1)
    objective = build_objective(name, beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss, metrics = run(objective, policy, reference)
    c, r = Role.parse(f"{context}/chosen"), Role.parse(f"{context}/rejected")
    rows = [ref_dpo(val(policy, c, g), val(policy, r, g), float(reference[c][g]),
                    float(reference[r][g]), n(policy, c, g), n(policy, r, g), beta, loss_type, eps)
            for g in range(G)]
    torch.testing.assert_close(loss, torch.tensor(expected_mean([x[0] for x in rows]),
                                                  dtype=torch.float64), **TOL)
    torch.testing.assert_close(metrics[f"{context}/rewards/chosen"].item(),
                               expected_mean([x[1] for x in rows]), **TOL)
    torch.testing.assert_close(metrics[f"{context}/rewards/margins"].item(),
                               expected_mean([x[1] - x[2] for x in rows]), **TOL)
    torch.testing.assert_close(metrics[f"{context}/rewards/accuracies"].item(),
                               expected_mean([float(x[1] > x[2]) for x in rows]), **TOL)
    assert objective.reference_roles == (c, r)


def test_simpo_matches_reference():
    policy, reference = random_inputs(2)
    loss, metrics = run(build_objective("simpo", beta=1.5, gamma=0.3), policy, {})
    rows = [ref_simpo(val(policy, Role.SHORT_CHOSEN, g), val(policy, Role.SHORT_REJECTED, g),
                      n(policy, Role.SHORT_CHOSEN, g), n(policy, Role.SHORT_REJECTED, g), 1.5, 0.3)
            for g in range(G)]
    assert math.isclose(loss.item(), expected_mean([x[0] for x in rows]), rel_tol=1e-10)
    assert math.isclose(metrics["short/rewards/rejected"].item(),
                        expected_mean([x[2] for x in rows]), rel_tol=1e-10)


@pytest.mark.parametrize("lam_key", ["lambda", "odds_ratio_weight"])
def test_orpo_matches_reference(lam_key):
    policy, _ = random_inputs(3)
    loss, metrics = run(build_objective("orpo", **{lam_key: 0.25}), policy, {})
    rows = [ref_orpo(val(policy, Role.SHORT_CHOSEN, g), val(policy, Role.SHORT_REJECTED, g),
                     n(policy, Role.SHORT_CHOSEN, g), n(policy, Role.SHORT_REJECTED, g), 0.25)
            for g in range(G)]
    assert math.isclose(loss.item(), expected_mean([x[0] for x in rows]), rel_tol=1e-10)
    assert math.isclose(metrics["short/rewards/chosen"].item(), expected_mean([x[1] for x in rows]),
                        rel_tol=1e-10)
    assert math.isclose(metrics["nll"].item(),
                        expected_mean([-val(policy, Role.SHORT_CHOSEN, g) / n(policy, Role.SHORT_CHOSEN, g)
                                       for g in range(G)]), rel_tol=1e-10)


@pytest.mark.parametrize("context", ["short", "long"])
def test_sft_matches_reference(context):
    policy, _ = random_inputs(4)
    role = Role.parse(f"{context}/chosen")
    loss, _ = run(build_objective("sft", context=context), policy, {})
    expected = expected_mean([-val(policy, role, g) / n(policy, role, g) for g in range(G)])
    assert math.isclose(loss.item(), expected, rel_tol=1e-10)


# ---------------------------------------------------------------------------------------------
# SoLoPO and LongPO
# ---------------------------------------------------------------------------------------------
def ref_base(base, params, policy, reference, context, response, g, ref_context=None):
    role = Role.parse(f"{context}/{response}")
    p, tokens = val(policy, role, g), n(policy, role, g)
    if base == "dpo":
        ref = float(reference[Role.parse(f"{ref_context or context}/{response}")][g])
        if params.get("loss_type") == "ipo":
            return params["beta"] * (p - ref) / tokens
        return params["beta"] * (p - ref)
    if base == "simpo":
        return params["beta"] * p / tokens
    return log_odds(p / tokens)


def ref_pair(base, params, policy, reference, g):
    c, r = Role.SHORT_CHOSEN, Role.SHORT_REJECTED
    if base == "dpo":
        return ref_dpo(val(policy, c, g), val(policy, r, g), float(reference[c][g]),
                       float(reference[r][g]), n(policy, c, g), n(policy, r, g), params["beta"],
                       params.get("loss_type", "sigmoid"), params.get("label_smoothing", 0.0))[0]
    if base == "simpo":
        return ref_simpo(val(policy, c, g), val(policy, r, g), n(policy, c, g), n(policy, r, g),
                         params["beta"], params["gamma"])[0]
    return ref_orpo(val(policy, c, g), val(policy, r, g), n(policy, c, g), n(policy, r, g),
                    params["lambda"])[0]


BASES = [("dpo", {"beta": 0.2}), ("dpo", {"beta": 0.2, "loss_type": "ipo"}),
         ("dpo", {"beta": 0.2, "label_smoothing": 0.1}), ("simpo", {"beta": 2.0, "gamma": 0.5}),
         ("orpo", {"lambda": 0.3})]


@pytest.mark.parametrize("base,params", BASES)
@pytest.mark.parametrize("solo_ra", ["chosen", "both"])
@pytest.mark.parametrize("solo_ra_reference", ["long", "short"])
def test_solopo_matches_reference(base, params, solo_ra, solo_ra_reference):
    alpha = 1.7
    policy, reference = random_inputs(5)
    objective = build_objective("solopo", base=base, alpha=alpha, solo_ra=solo_ra,
                                solo_ra_reference=solo_ra_reference, **params)
    loss, metrics = run(objective, policy, reference)
    ref_context = "short" if solo_ra_reference == "short" else None
    responses = ["chosen", "rejected"] if solo_ra == "both" else ["chosen"]
    per_group, gaps = [], []
    for g in range(G):
        total = ref_pair(base, params, policy, reference, g)
        for response in responses:
            short = ref_base(base, params, policy, reference, "short", response, g)
            long = ref_base(base, params, policy, reference, "long", response, g, ref_context)
            total += alpha * abs(short - long)
            if response == "chosen":
                gaps.append(abs(short - long))
        per_group.append(total)
    assert math.isclose(loss.item(), expected_mean(per_group), rel_tol=1e-10)
    assert math.isclose(metrics["solo_ra/gap"].item(), expected_mean(gaps), rel_tol=1e-10)
    expected_policy = {Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN}
    if solo_ra == "both":
        expected_policy.add(Role.LONG_REJECTED)
    assert set(objective.policy_roles) == expected_policy
    if base != "dpo":
        assert objective.reference_roles == ()
    elif solo_ra_reference == "short":
        assert set(objective.reference_roles) == {Role.SHORT_CHOSEN, Role.SHORT_REJECTED}
    else:
        assert set(objective.reference_roles) == expected_policy


def test_solopo_default_alpha_follows_the_paper():
    assert build_objective("solopo", base="dpo").params.alpha == 3.0
    assert build_objective("solopo", base="simpo").params.alpha == 1.0
    assert build_objective("solopo", base="orpo").params.alpha == 1.0


@pytest.mark.parametrize("include_context", [True, False])
@pytest.mark.parametrize("beta,lam", [(0.1, 0.01), (0.01, 0.5)])
def test_longpo_matches_reference(include_context, beta, lam):
    policy, reference = random_inputs(6)
    objective = build_objective("longpo", beta=beta, nll_include_context=include_context,
                                **{"lambda": lam})
    loss, metrics = run(objective, policy, reference)
    per_group = []
    for g in range(G):
        chosen = policy[Role.LONG_CHOSEN]
        if include_context:
            nll = -float(chosen.sequence_logps[g]) / float(chosen.sequence_num_tokens[g])
        else:
            nll = -val(policy, Role.LONG_CHOSEN, g) / n(policy, Role.LONG_CHOSEN, g)
        margin = beta * ((val(policy, Role.LONG_CHOSEN, g) - float(reference[Role.SHORT_CHOSEN][g]))
                         - (val(policy, Role.LONG_REJECTED, g) - float(reference[Role.SHORT_REJECTED][g])))
        per_group.append(nll - lam * log_sigmoid(margin))
    assert math.isclose(loss.item(), expected_mean(per_group), rel_tol=1e-10)
    assert objective.reference_roles == (Role.SHORT_CHOSEN, Role.SHORT_REJECTED)
    assert objective.sequence_logps_roles == ((Role.LONG_CHOSEN,) if include_context else ())


def test_longpo_multi_turn_reference_is_the_sum_of_turns():
    """Multi-turn: the trainer sums the per-turn short reference log-probs of a group; the
    objective then sees exactly that sum (Eq. 13 with log-probs summed over turns, as the code)."""
    policy, reference = random_inputs(7)
    turns = torch.randn(G, 3, dtype=torch.float64) - 5
    reference[Role.SHORT_CHOSEN] = turns.sum(1)
    objective = build_objective("longpo")
    loss, _ = run(objective, policy, reference)
    reference_split = dict(reference, **{Role.SHORT_CHOSEN: turns[:, 0] + turns[:, 1] + turns[:, 2]})
    torch.testing.assert_close(loss, run(objective, policy, reference_split)[0], **TOL)


# ---------------------------------------------------------------------------------------------
# Known values, gradients, stability, additivity
# ---------------------------------------------------------------------------------------------
def test_equal_logps_give_dpo_loss_log2():
    policy, reference = random_inputs(8)
    policy[Role.SHORT_REJECTED] = policy[Role.SHORT_CHOSEN]
    reference[Role.SHORT_REJECTED] = reference[Role.SHORT_CHOSEN]
    loss, metrics = run(build_objective("dpo"), policy, reference)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    assert metrics["short/rewards/accuracies"].item() == 0.0  # ties count as wrong


def test_solo_ra_is_zero_when_short_and_long_rewards_are_equal():
    policy, reference = random_inputs(9)
    policy[Role.LONG_CHOSEN] = policy[Role.SHORT_CHOSEN]
    policy[Role.LONG_REJECTED] = policy[Role.SHORT_REJECTED]
    for role in (Role.LONG_CHOSEN, Role.LONG_REJECTED):
        reference[role] = reference[Role.parse(f"short/{role.response}")]
    for base in ("dpo", "simpo", "orpo"):
        objective = build_objective("solopo", base=base, solo_ra="both", alpha=5.0)
        loss, metrics = run(objective, policy, reference)
        assert metrics["solo_ra/gap"].item() == 0.0 and metrics["solo_ra/loss"].item() == 0.0
        assert math.isclose(loss.item(), metrics["po_loss"].item(), rel_tol=1e-12)


@pytest.mark.parametrize("name,kwargs", [
    ("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("dpo", {"label_smoothing": 0.1}),
    ("simpo", {}), ("orpo", {}), ("sft", {}), ("long_dpo", {}), ("longpo", {}),
    ("longpo", {"nll_include_context": False}),
    ("solopo", {"base": "dpo"}), ("solopo", {"base": "simpo", "solo_ra": "both"}),
    ("solopo", {"base": "orpo", "solo_ra": "both"}),
    ("solopo", {"base": "dpo", "solo_ra_reference": "short", "solo_ra": "both"}),
])
def test_gradcheck_float64(name, kwargs):
    objective = build_objective(name, **kwargs)
    policy, reference = random_inputs(10, requires_grad=True)
    roles = list(objective.policy_roles)
    leaves = [policy[r].logps for r in roles] + [policy[r].sequence_logps for r in roles]

    def fn(*tensors):
        patched = {}
        for i, role in enumerate(roles):
            patched[role] = RoleLogps(tensors[i], policy[role].num_tokens, tensors[len(roles) + i],
                                      policy[role].sequence_num_tokens)
        return run(objective, patched, reference)[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("average", [-1e-12, -1e-7, -1e-3, -0.5, -20.0, -1e3, -1e4])
def test_orpo_is_finite_near_zero_and_very_negative(average):
    policy = {}
    for role in (Role.SHORT_CHOSEN, Role.SHORT_REJECTED):
        tokens = torch.full((G,), 7.0)
        logps = (torch.full((G,), average) * tokens).requires_grad_(True)
        policy[role] = RoleLogps(logps, tokens)
    policy[Role.SHORT_REJECTED].logps.data *= 1.5
    loss, metrics = run(build_objective("orpo"), policy, {})
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    for role in policy:
        assert torch.isfinite(policy[role].logps.grad).all()
    # fp32 inputs are computed in fp32 and stay finite too
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name,kwargs", [("dpo", {}), ("orpo", {}), ("longpo", {}),
                                         ("solopo", {"base": "dpo", "solo_ra": "both"}),
                                         ("solopo", {"base": "simpo"})])
def test_micro_batch_losses_and_metrics_add_up_to_the_full_batch(name, kwargs):
    objective = build_objective(name, **kwargs)
    policy, reference = random_inputs(11)
    full_loss, full_metrics = run(objective, policy, reference, num_groups=G)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total_loss = 0.0
    totals = {}
    for part in parts:
        sub_policy = {r: RoleLogps(v.logps[part], v.num_tokens[part], v.sequence_logps[part],
                                   v.sequence_num_tokens[part]) for r, v in policy.items()}
        sub_reference = {r: v[part] for r, v in reference.items()}
        loss, metrics = run(objective, sub_policy, sub_reference, num_groups=G)
        total_loss = total_loss + loss
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
    torch.testing.assert_close(total_loss, full_loss, **TOL)
    assert set(totals) == set(full_metrics)
    for key in full_metrics:
        torch.testing.assert_close(totals[key], full_metrics[key], **TOL, msg=key)


def test_low_precision_inputs_are_computed_in_fp32():
    policy, reference = random_inputs(12)
    low = {r: RoleLogps(v.logps.bfloat16(), v.num_tokens.bfloat16()) for r, v in policy.items()}
    loss, _ = run(build_objective("simpo"), low, {})
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Registry and validation
# ---------------------------------------------------------------------------------------------
def test_every_registered_name_builds():
    for name in OBJECTIVES:
        kwargs = {"base": "dpo"} if name == "solopo" else {}
        assert build_objective(name, **kwargs).name == name


@pytest.mark.parametrize("name,kwargs,message", [
    ("dpx", {}, "unknown objective 'dpx'; valid objectives: dpo, simpo, orpo, sft, solopo, longpo, long_dpo"),
    ("solopo", {}, "solopo needs base=<one of dpo, simpo, orpo>"),
    ("solopo", {"base": "sft"}, "valid bases: dpo, simpo, orpo"),
    ("dpo", {"beta": 0.0}, "beta must be > 0"),
    ("dpo", {"beta": -1.0}, "beta must be > 0"),
    ("solopo", {"base": "dpo", "alpha": -0.5}, "alpha must be >= 0"),
    ("solopo", {"base": "dpo", "solo_ra": "all"}, "valid: chosen, both"),
    ("solopo", {"base": "dpo", "solo_ra_reference": "medium"}, "valid: long, short"),
    ("solopo", {"base": "simpo", "lambda": 1.0}, "valid: alpha, solo_ra, solo_ra_reference, beta, gamma"),
    ("dpo", {"label_smoothing": 0.6}, "label_smoothing must be in [0, 0.5)"),
    ("dpo", {"loss_type": "hinge"}, "valid: sigmoid, ipo"),
    ("dpo", {"gamma": 1.0}, "valid: beta, loss_type, label_smoothing"),
    ("longpo", {"lambda": -1.0}, "must be >= 0"),
    ("simpo", {"gamma": -1.0}, "gamma must be >= 0"),
    ("sft", {"context": "medium"}, "valid: short, long"),
])
def test_invalid_configuration_messages(name, kwargs, message):
    with pytest.raises(ValueError) as err:
        build_objective(name, **kwargs)
    assert message in str(err.value)


def test_missing_role_is_named():
    policy, reference = random_inputs(13, roles=(Role.SHORT_CHOSEN, Role.SHORT_REJECTED))
    with pytest.raises(ValueError, match="needs policy log-probs for role long/chosen"):
        run(build_objective("solopo", base="simpo"), policy, reference)
    del reference[Role.SHORT_REJECTED]
    with pytest.raises(ValueError, match="needs reference log-probs for role short/rejected"):
        run(build_objective("dpo"), policy, reference)
