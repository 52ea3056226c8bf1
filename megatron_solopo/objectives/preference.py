"""Base preference losses (DPO, SimPO, ORPO) and SFT, each on one context (short or long).

A base loss defines a *reward* ``r(x, y)`` and a *pair loss* on (chosen, rejected). SoLoPO reuses
both: its SoLo-RA term compares the base's own reward on the short and on the long context.
Formulas, defaults and choices: docs/objectives.md.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_solopo.objectives.base import (Hyperparameters, Objective, ObjectiveInputs,
                                             RoleLogps, as_float, pair_metrics)
from megatron_solopo.roles import Role

CONTEXTS = ("short", "long")


def roles_for(context: str) -> tuple[Role, Role]:
    return Role.parse(f"{context}/chosen"), Role.parse(f"{context}/rejected")


def check_context(context: str) -> None:
    if context not in CONTEXTS:
        raise ValueError(f"context={context!r} is not valid; valid: {', '.join(CONTEXTS)}")


def average_logps(policy: RoleLogps) -> Tensor:
    return as_float(policy.logps) / as_float(policy.num_tokens)


class BaseLoss(abc.ABC):
    """Reward and pair loss of one preference algorithm."""

    name: str = ""
    needs_reference: bool = False
    params: Hyperparameters

    @abc.abstractmethod
    def reward(self, policy: RoleLogps, reference: Tensor | None) -> Tensor:
        """``r(x, y)`` per group ``[G]``."""

    @abc.abstractmethod
    def pair_loss(self, chosen: RoleLogps, rejected: RoleLogps, ref_chosen: Tensor | None,
                  ref_rejected: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-group loss ``[G]`` and extra per-group metrics (beyond rewards and log-probs)."""

    def describe(self) -> str:
        return f"{self.name}({self.params.summary()})"


@dataclasses.dataclass(frozen=True)
class DPOParams(Hyperparameters):
    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * (logp_pi - logp_ref)`` (> 0)."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: DPO (Rafailov et al.); ``ipo``: the squared loss of Azar et al. on
    length-averaged log-ratios (as TRL does)."""

    label_smoothing: float = 0.0
    """Conservative DPO: the preference label is flipped with this probability, in [0, 0.5)
    (sigmoid only)."""

    def validate(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type=sigmoid only; set it to 0 "
                             "with loss_type=ipo")


class DPOLoss(BaseLoss):
    name = "dpo"
    needs_reference = True

    def __init__(self, params: DPOParams):
        self.params = params

    def _log_ratio(self, policy: RoleLogps, reference: Tensor) -> Tensor:
        ratio = as_float(policy.logps) - as_float(reference)
        if self.params.loss_type == "ipo":
            ratio = ratio / as_float(policy.num_tokens)
        return ratio

    def reward(self, policy, reference):
        return self.params.beta * self._log_ratio(policy, reference)

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        beta = self.params.beta
        logits = self._log_ratio(chosen, ref_chosen) - self._log_ratio(rejected, ref_rejected)
        if self.params.loss_type == "ipo":
            return (logits - 1.0 / (2.0 * beta)) ** 2, {}
        eps = self.params.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
        return losses, {}


@dataclasses.dataclass(frozen=True)
class SimPOParams(Hyperparameters):
    beta: float = 2.0
    """Reward scale: ``r = beta * logp / |y|`` (> 0)."""

    gamma: float = 0.5
    """Target reward margin subtracted inside the sigmoid (>= 0)."""

    def validate(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0 (a target margin), got {self.gamma}")


class SimPOLoss(BaseLoss):
    name = "simpo"

    def __init__(self, params: SimPOParams):
        self.params = params

    def reward(self, policy, reference=None):
        return self.params.beta * average_logps(policy)

    def pair_loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None):
        margin = self.reward(chosen) - self.reward(rejected) - self.params.gamma
        return -F.logsigmoid(margin), {}


def log_odds(avg_logp: Tensor) -> Tensor:
    """``log(p / (1 - p)) = a - log(1 - exp(a))`` for an average log-prob ``a = log p <= 0``.

    ``log(1 - exp(a))`` is computed as ``log(-expm1(a))``: ``1 - exp(a)`` cancels to 0 in fp32
    for ``a > -3e-8`` (and loses digits well before), ``expm1`` does not; for ``a -> -inf`` both
    tend to 0. ``a`` is clamped to at most minus the smallest normal number: exactly 0 (certainty,
    reachable when fp32 log-softmax rounds to 0) has infinite odds."""
    tiny = torch.finfo(avg_logp.dtype).tiny
    a = torch.clamp(avg_logp, max=-tiny)
    return a - torch.log(-torch.expm1(a))


@dataclasses.dataclass(frozen=True)
class ORPOParams(Hyperparameters):
    odds_ratio_weight: float = 0.1
    """lambda: weight of the odds-ratio term next to the chosen NLL, >= 0 (alias ``lambda``)."""

    def validate(self) -> None:
        if not self.odds_ratio_weight >= 0:
            raise ValueError(f"odds_ratio_weight (lambda) must be >= 0, got "
                             f"{self.odds_ratio_weight}")


class ORPOLoss(BaseLoss):
    name = "orpo"

    def __init__(self, params: ORPOParams):
        self.params = params

    def reward(self, policy, reference=None):
        return log_odds(average_logps(policy))

    def pair_loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None):
        nll = -average_logps(chosen)
        odds_ratio = F.logsigmoid(self.reward(chosen) - self.reward(rejected))
        losses = nll - self.params.odds_ratio_weight * odds_ratio
        return losses, {"nll": nll, "orpo/log_odds_ratio": odds_ratio}


# name -> (loss class, hyper-parameter class): the pairwise losses SoLoPO can wrap.
BASE_LOSSES: dict[str, tuple[type, type]] = {
    "dpo": (DPOLoss, DPOParams),
    "simpo": (SimPOLoss, SimPOParams),
    "orpo": (ORPOLoss, ORPOParams),
}


class PairwiseObjective(Objective):
    """A base preference loss on one context (``dpo``, ``simpo``, ``orpo``; ``long_dpo``)."""

    def __init__(self, name: str, base: BaseLoss, context: str = "short"):
        check_context(context)
        self.name = name
        self.base = base
        self.params = base.params
        self.context = context
        self.policy_roles = roles_for(context)
        self.reference_roles = roles_for(context) if base.needs_reference else ()

    def describe(self) -> str:
        return f"{self.name}({self.params.summary()}, context={self.context})"

    def group_losses(self, inputs: ObjectiveInputs):
        chosen_role, rejected_role = self.policy_roles
        chosen, rejected = inputs.policy[chosen_role], inputs.policy[rejected_role]
        ref_chosen = inputs.reference.get(chosen_role)
        ref_rejected = inputs.reference.get(rejected_role)
        losses, extra = self.base.pair_loss(chosen, rejected, ref_chosen, ref_rejected)
        metrics = pair_metrics(self.context, self.base.reward(chosen, ref_chosen),
                               self.base.reward(rejected, ref_rejected),
                               as_float(chosen.logps), as_float(rejected.logps))
        metrics.update(extra)
        return losses, metrics


@dataclasses.dataclass(frozen=True)
class SFTParams(Hyperparameters):
    context: Literal["short", "long"] = "short"
    """Context the chosen response is conditioned on: ``short`` like the other base losses;
    ``long`` is the long-context SFT baseline (LongPO's "SFT")."""


class SFTObjective(Objective):
    """Length-normalized NLL of the chosen response (a baseline)."""

    name = "sft"

    def __init__(self, params: SFTParams):
        self.params = params
        self.policy_roles = (Role.parse(f"{params.context}/chosen"),)

    def group_losses(self, inputs: ObjectiveInputs):
        chosen = inputs.policy[self.policy_roles[0]]
        nll = -average_logps(chosen)
        return nll, {"nll": nll, f"{self.params.context}/logps/chosen": as_float(chosen.logps)}
