"""Every objective and option against an independent re-implementation written here (python
floats, i.e. float64, one group at a time; 1e-10): the loss and every metric, by name. Also the
roles each objective declares, known values and LongPO's multi-turn reference sums.

Shared helpers for tests/unit/test_objectives_*.py live here too."""

import math
import zlib

import pytest
import torch

from megatron_solopo.objectives import ObjectiveInputs, RoleLogps, build_objective
from megatron_solopo.roles import ALL_ROLES, Role

G = 6  # groups in these tests
TOL = dict(rel_tol=1e-10, abs_tol=1e-10)
SC, SR, LC, LR = Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN, Role.LONG_REJECTED

# Every objective with every option (name, hyper-parameters as a config would give them).
CONFIGS = [
    ("dpo", {}), ("dpo", {"beta": 0.3}), ("dpo", {"loss_type": "ipo", "beta": 0.5}),
    ("dpo", {"label_smoothing": 0.2}), ("dpo", {"context": "long"}),
    ("dpo", {"context": "long", "loss_type": "ipo"}),
    ("long_dpo", {}), ("long_dpo", {"loss_type": "ipo"}), ("long_dpo", {"label_smoothing": 0.1}),
    ("simpo", {}), ("simpo", {"beta": 1.5, "gamma": 0.0}), ("simpo", {"context": "long"}),
    ("orpo", {}), ("orpo", {"lambda": 0.25}), ("orpo", {"odds_ratio_weight": 0.0}),
    ("orpo", {"context": "long"}),
    ("sft", {}), ("sft", {"context": "long"}),
    ("longpo", {}), ("longpo", {"nll_include_context": False}),
    ("longpo", {"beta": 0.01, "lambda": 0.5}),
] + [
    ("solopo", dict(base=base, solo_ra=solo_ra, solo_ra_reference=reference, **extra))
    for base, extra in [("dpo", {}), ("dpo", {"beta": 0.2, "loss_type": "ipo"}),
                        ("dpo", {"label_smoothing": 0.1, "alpha": 1.7}),
                        ("simpo", {}), ("simpo", {"beta": 1.0, "gamma": 0.3, "alpha": 0.0}),
                        ("orpo", {}), ("orpo", {"lambda": 0.3, "alpha": 4.0})]
    for solo_ra in ("chosen", "both") for reference in ("long", "short")
] + [
    ("solopo", {"base": {"name": "dpo", "beta": 0.2}, "alpha": 2.0}),
    ("solopo", {"base": {"name": "orpo", "lambda": 0.2}, "solo_ra": "both"}),
]


def config_id(config):
    return f"{config[0]}-" + "-".join(f"{k}={v}" for k, v in sorted(config[1].items(), key=str))


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------
def random_inputs(seed, roles=ALL_ROLES, requires_grad=False, groups=G, dtype=torch.float64):
    """Realistic per-group sums: average log-probs in [-3, -0.05] (inside ORPO's domain), whole
    sequences longer than their responses, references near the policy."""
    gen = torch.Generator().manual_seed(seed)
    policy, reference = {}, {}
    for role in roles:
        tokens = torch.randint(3, 40, (groups,), generator=gen).double()
        logps = -(torch.rand(groups, generator=gen, dtype=torch.float64) * 2.95 + 0.05) * tokens
        seq_tokens = tokens + torch.randint(5, 200, (groups,), generator=gen).double()
        seq_logps = logps - torch.rand(groups, generator=gen, dtype=torch.float64) * seq_tokens
        reference[role] = (logps + torch.randn(groups, generator=gen, dtype=torch.float64)).to(dtype)
        policy[role] = RoleLogps(logps.to(dtype).clone().requires_grad_(requires_grad),
                                 tokens.to(dtype), seq_logps.to(dtype).clone().requires_grad_(requires_grad),
                                 seq_tokens.to(dtype))
    return policy, reference


def run(objective, policy, reference, num_groups=G):
    return objective(ObjectiveInputs(policy=policy, reference=reference, num_groups=num_groups))


# ---------------------------------------------------------------------------------------------
# The independent re-implementation: python floats, one group at a time
# ---------------------------------------------------------------------------------------------
def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_odds(a):
    return a - math.log(1.0 - math.exp(a))


class Group:
    """Group g's values as python floats."""

    def __init__(self, policy, reference, g):
        self.p = {r: v.logps[g].item() for r, v in policy.items()}
        self.n = {r: v.num_tokens[g].item() for r, v in policy.items()}
        self.seq_p = {r: v.sequence_logps[g].item() for r, v in policy.items()}
        self.seq_n = {r: v.sequence_num_tokens[g].item() for r, v in policy.items()}
        self.ref = {r: v[g].item() for r, v in reference.items()}


def reward(algorithm, kw, grp, role, ref_role):
    p, n = grp.p[role], grp.n[role]
    if algorithm == "dpo":
        ratio = p - grp.ref[ref_role]
        return kw.get("beta", 0.1) * (ratio / n if kw.get("loss_type") == "ipo" else ratio)
    if algorithm == "simpo":
        return kw.get("beta", 2.0) * p / n
    return log_odds(p / n)


def pair(algorithm, kw, grp, context):
    """(loss, metrics) of a base pairwise loss on one context, TRL metric names."""
    c, r = Role(f"{context}/chosen"), Role(f"{context}/rejected")
    rw, rl = reward(algorithm, kw, grp, c, c), reward(algorithm, kw, grp, r, r)
    extra = {}
    if algorithm == "dpo" and kw.get("loss_type") == "ipo":
        logits = (grp.p[c] - grp.ref[c]) / grp.n[c] - (grp.p[r] - grp.ref[r]) / grp.n[r]
        loss = (logits - 1 / (2 * kw.get("beta", 0.1))) ** 2
    elif algorithm == "dpo":
        beta, eps = kw.get("beta", 0.1), kw.get("label_smoothing", 0.0)
        logits = (grp.p[c] - grp.ref[c]) - (grp.p[r] - grp.ref[r])
        loss = -(1 - eps) * log_sigmoid(beta * logits) - eps * log_sigmoid(-beta * logits)
    elif algorithm == "simpo":
        loss = -log_sigmoid(rw - rl - kw.get("gamma", 0.5))
    else:
        lam = kw.get("lambda", kw.get("odds_ratio_weight", 0.1))
        nll = -grp.p[c] / grp.n[c]
        extra = {"nll": nll, "orpo/log_odds_ratio": log_sigmoid(rw - rl)}
        loss = nll - lam * log_sigmoid(rw - rl)
    metrics = {f"{context}/rewards/chosen": rw, f"{context}/rewards/rejected": rl,
               f"{context}/rewards/margins": rw - rl,
               f"{context}/rewards/accuracies": 1.0 if rw > rl else 0.0,
               f"{context}/logps/chosen": grp.p[c], f"{context}/logps/rejected": grp.p[r], **extra}
    return loss, metrics


def expected_group(name, kw, grp):
    kw = dict(kw)
    if name in ("dpo", "simpo", "orpo", "long_dpo"):
        context = kw.pop("context", "long" if name == "long_dpo" else "short")
        return pair("dpo" if name == "long_dpo" else name, kw, grp, context)
    if name == "sft":
        context = kw.get("context", "short")
        nll = -grp.p[Role(f"{context}/chosen")] / grp.n[Role(f"{context}/chosen")]
        return nll, {"nll": nll, f"{context}/logps/chosen": grp.p[Role(f"{context}/chosen")]}
    if name == "longpo":
        beta, lam = kw.get("beta", 0.1), kw.get("lambda", 0.01)
        if kw.get("nll_include_context", True):
            nll = -grp.seq_p[LC] / grp.seq_n[LC]
        else:
            nll = -grp.p[LC] / grp.n[LC]
        rw, rl = beta * (grp.p[LC] - grp.ref[SC]), beta * (grp.p[LR] - grp.ref[SR])
        preference = -log_sigmoid(rw - rl)
        return nll + lam * preference, {
            "long/rewards/chosen": rw, "long/rewards/rejected": rl, "long/rewards/margins": rw - rl,
            "long/rewards/accuracies": 1.0 if rw > rl else 0.0, "long/logps/chosen": grp.p[LC],
            "long/logps/rejected": grp.p[LR], "nll": nll, "longpo/preference_loss": preference}
    # solopo
    base = kw.pop("base")
    if isinstance(base, dict):
        kw.update({k: v for k, v in base.items() if k != "name"})
        base = base["name"]
    alpha = kw.pop("alpha", {"dpo": 3.0, "simpo": 1.0, "orpo": 1.0}[base])
    responses = ["chosen", "rejected"] if kw.pop("solo_ra", "chosen") == "both" else ["chosen"]
    short_reference = kw.pop("solo_ra_reference", "long") == "short"
    po_loss, metrics = pair(base, kw, grp, "short")
    metrics["po_loss"] = po_loss
    total_gap, long_rewards = 0.0, {}
    for response in responses:
        short_role, long_role = Role(f"short/{response}"), Role(f"long/{response}")
        r_short = reward(base, kw, grp, short_role, short_role)
        r_long = reward(base, kw, grp, long_role, short_role if short_reference else long_role)
        long_rewards[response] = r_long
        gap = abs(r_short - r_long)
        total_gap += gap
        metrics["solo_ra/gap" + ("" if response == "chosen" else "_rejected")] = gap
        metrics[f"long/rewards/{response}"] = r_long
        metrics[f"long/logps/{response}"] = grp.p[long_role]
    if len(responses) == 2:
        metrics["long/rewards/margins"] = long_rewards["chosen"] - long_rewards["rejected"]
        metrics["long/rewards/accuracies"] = float(long_rewards["chosen"] > long_rewards["rejected"])
    metrics["solo_ra/loss"] = alpha * total_gap
    return po_loss + alpha * total_gap, metrics


def expected(name, kw, policy, reference, groups=G):
    """Global-batch means of the loss and every metric."""
    rows = [expected_group(name, kw, Group(policy, reference, g)) for g in range(groups)]
    metrics = {key: sum(row[1][key] for row in rows) / groups for key in rows[0][1]}
    metrics["loss"] = sum(row[0] for row in rows) / groups
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_loss_and_every_metric_match_the_float64_reference(name, kw):
    policy, reference = random_inputs(zlib.crc32(config_id((name, kw)).encode()), requires_grad=True)
    objective = build_objective(name, **kw)
    loss, metrics = run(objective, policy, reference)
    want_loss, want_metrics = expected(name, kw, policy, reference)
    assert loss.dtype == torch.float64 and loss.shape == () and loss.requires_grad
    assert math.isclose(loss.item(), want_loss, **TOL)
    assert sorted(metrics) == sorted(want_metrics)
    for key, value in metrics.items():
        assert value.shape == () and not value.requires_grad, key
        assert math.isclose(value.item(), want_metrics[key], **TOL), key


ROLES = {  # (name, options) -> (policy roles, reference roles, sequence_logps roles)
    ("dpo", ()): ({SC, SR}, {SC, SR}, set()),
    ("dpo", (("context", "long"),)): ({LC, LR}, {LC, LR}, set()),
    ("long_dpo", ()): ({LC, LR}, {LC, LR}, set()),
    ("simpo", ()): ({SC, SR}, set(), set()),
    ("orpo", ()): ({SC, SR}, set(), set()),
    ("sft", ()): ({SC}, set(), set()),
    ("sft", (("context", "long"),)): ({LC}, set(), set()),
    ("longpo", ()): ({LC, LR}, {SC, SR}, {LC}),
    ("longpo", (("nll_include_context", False),)): ({LC, LR}, {SC, SR}, set()),
    ("solopo", (("base", "dpo"),)): ({SC, SR, LC}, {SC, SR, LC}, set()),
    ("solopo", (("base", "dpo"), ("solo_ra", "both"))): ({SC, SR, LC, LR}, {SC, SR, LC, LR}, set()),
    ("solopo", (("base", "dpo"), ("solo_ra_reference", "short"))): ({SC, SR, LC}, {SC, SR}, set()),
    ("solopo", (("base", "dpo"), ("solo_ra", "both"), ("solo_ra_reference", "short"))):
        ({SC, SR, LC, LR}, {SC, SR}, set()),
    ("solopo", (("base", "simpo"),)): ({SC, SR, LC}, set(), set()),
    ("solopo", (("base", "orpo"), ("solo_ra", "both"))): ({SC, SR, LC, LR}, set(), set()),
}


@pytest.mark.parametrize("key", list(ROLES), ids=[f"{k[0]}{dict(k[1])}" for k in ROLES])
def test_declared_roles(key):
    objective = build_objective(key[0], **dict(key[1]))
    policy, reference, sequence = ROLES[key]
    assert set(objective.policy_roles) == policy and len(objective.policy_roles) == len(policy)
    assert set(objective.reference_roles) == reference
    assert set(objective.sequence_logps_roles) == sequence
    assert objective.needs_reference == bool(reference)
    assert all(isinstance(role, Role) for role in objective.policy_roles + objective.reference_roles)


def test_equal_chosen_and_rejected_give_dpo_loss_log2():
    policy, reference = random_inputs(8)
    policy[SR], reference[SR] = policy[SC], reference[SC]
    loss, metrics = run(build_objective("dpo", beta=0.7), policy, reference)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    assert metrics["short/rewards/accuracies"].item() == 0.0  # ties count as wrong
    policy[LR], reference[LR] = policy[LC], reference[LC]
    assert math.isclose(run(build_objective("long_dpo"), policy, reference)[0].item(), math.log(2),
                        rel_tol=1e-12)


def test_policy_equal_to_reference_gives_dpo_loss_log2():
    policy, _ = random_inputs(14)
    reference = {role: values.logps.detach().clone() for role, values in policy.items()}
    assert math.isclose(run(build_objective("dpo"), policy, reference)[0].item(), math.log(2),
                        rel_tol=1e-12)


@pytest.mark.parametrize("base,options", [("dpo", {}), ("dpo", {"loss_type": "ipo"}),
                                          ("dpo", {"solo_ra_reference": "short"}),
                                          ("simpo", {}), ("orpo", {})])
def test_solo_ra_is_zero_when_short_and_long_rewards_are_equal(base, options):
    policy, reference = random_inputs(9)
    policy[LC], policy[LR] = policy[SC], policy[SR]
    reference[LC], reference[LR] = reference[SC], reference[SR]
    objective = build_objective("solopo", base=base, solo_ra="both", alpha=5.0, **options)
    loss, metrics = run(objective, policy, reference)
    for key in ("solo_ra/gap", "solo_ra/gap_rejected", "solo_ra/loss"):
        assert metrics[key].item() == 0.0
    assert loss.item() == metrics["po_loss"].item()
    # alpha = 0 is the base loss on the short context, whatever the long rewards
    policy, reference = random_inputs(10)
    plain = run(build_objective(base, **{k: v for k, v in options.items() if "solo" not in k}),
                policy, reference)[0]
    assert math.isclose(run(build_objective("solopo", base=base, alpha=0.0, **options), policy,
                            reference)[0].item(), plain.item(), rel_tol=1e-12)


def test_longpo_known_value_when_policy_equals_short_reference():
    """Preference term log 2 when logp_pi(y|x_L) = logp_ref(y|x_S) for both responses."""
    policy, reference = random_inputs(15)
    reference[SC], reference[SR] = policy[LC].logps.detach(), policy[LR].logps.detach()
    loss, metrics = run(build_objective("longpo", **{"lambda": 0.5}), policy, reference)
    assert math.isclose(metrics["longpo/preference_loss"].item(), math.log(2), rel_tol=1e-12)
    assert math.isclose(loss.item(), metrics["nll"].item() + 0.5 * math.log(2), rel_tol=1e-12)


def test_longpo_multi_turn_reference_is_the_sum_of_turn_log_probs():
    """Multi-turn: the trainer sums a group's per-turn short reference log-probs (and the long
    policy sequence carries every turn's response); the objective sees those sums, so the loss is
    Eq. 13 with log-probs summed over turns, as the official code does."""
    policy, reference = random_inputs(7)
    turns_chosen = torch.randn(G, 3, dtype=torch.float64) - 5
    turns_rejected = torch.randn(G, 3, dtype=torch.float64) - 6
    reference[SC], reference[SR] = turns_chosen.sum(1), turns_rejected.sum(1)
    loss, _ = run(build_objective("longpo"), policy, reference)
    per_group = []
    for g in range(G):
        margin = 0.1 * ((policy[LC].logps[g].item() - sum(turns_chosen[g].tolist()))
                        - (policy[LR].logps[g].item() - sum(turns_rejected[g].tolist())))
        nll = -policy[LC].sequence_logps[g].item() / policy[LC].sequence_num_tokens[g].item()
        per_group.append(nll - 0.01 * log_sigmoid(margin))
    assert math.isclose(loss.item(), sum(per_group) / G, **TOL)


def test_solopo_default_alpha_follows_the_paper():
    assert build_objective("solopo", base="dpo").params.alpha == 3.0
    assert build_objective("solopo", base="simpo").params.alpha == 1.0
    assert build_objective("solopo", base="orpo").params.alpha == 1.0
    assert build_objective("solopo", base="orpo", alpha=4).params.alpha == 4.0


def test_defaults_match_algorithms_md():
    dpo = build_objective("dpo").params
    assert (dpo.beta, dpo.loss_type, dpo.label_smoothing) == (0.1, "sigmoid", 0.0)
    simpo = build_objective("simpo").params
    assert (simpo.beta, simpo.gamma) == (2.0, 0.5)
    assert build_objective("orpo").params.odds_ratio_weight == 0.1
    longpo = build_objective("longpo").params
    assert (longpo.beta, longpo.preference_weight, longpo.nll_include_context) == (0.1, 0.01, True)
    solopo = build_objective("solopo", base="dpo")
    assert (solopo.params.solo_ra, solopo.params.solo_ra_reference) == ("chosen", "long")
    assert build_objective("sft").params.context == "short"
