"""Base preference losses (DPO, SimPO, ORPO) and SFT, each on one context (short or long).

A base loss defines a *reward* ``r(x, y)`` and a *pair loss* on (chosen, rejected). SoLoPO reuses
both: its SoLo-RA term compares the base's own reward on the short and on the long context.
Formulas, defaults and choices: docs/objectives.md.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_solopo.objectives.base import (Objective, ObjectiveInputs, RoleLogps, as_float,
                                             pair_metrics)
from megatron_solopo.roles import Role

Context = Literal["short", "long"]


def roles_for(context: str) -> tuple[Role, Role]:
    return Role.parse(f"{context}/chosen"), Role.parse(f"{context}/rejected")


def _check_context(context: str) -> None:
    if context not in ("short", "long"):
        raise ValueError(f"context={context!r}; valid: short, long")


class BaseLoss(abc.ABC):
    """Reward and pair loss of one preference algorithm."""

    name: str = ""
    needs_reference: bool = False

    @abc.abstractmethod
    def reward(self, policy: RoleLogps, reference: Optional[Tensor]) -> Tensor:
        """``r(x, y)`` per group ``[G]``."""

    @abc.abstractmethod
    def pair_loss(self, chosen: RoleLogps, rejected: RoleLogps, ref_chosen: Optional[Tensor],
                  ref_rejected: Optional[Tensor]) -> tuple[Tensor, dict]:
        """Per-group loss ``[G]`` and extra per-group metrics (beyond rewards and log-probs)."""


@dataclasses.dataclass(frozen=True)
class DPOParams:
    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * (logp_pi - logp_ref)``."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: DPO (Rafailov et al.); ``ipo``: squared loss of Azar et al. on length-averaged
    log-ratios (as TRL does)."""

    label_smoothing: float = 0.0
    """Conservative DPO: the preference label is flipped with this probability (sigmoid only)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type={self.loss_type!r}; valid: sigmoid, ipo")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type=sigmoid only")


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

    def reward(self, policy: RoleLogps, reference: Optional[Tensor]) -> Tensor:
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
class SimPOParams:
    beta: float = 2.0
    """Reward scale: ``r = beta * logp / |y|``."""

    gamma: float = 0.5
    """Target reward margin subtracted inside the sigmoid."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")


class SimPOLoss(BaseLoss):
    name = "simpo"

    def __init__(self, params: SimPOParams):
        self.params = params

    def reward(self, policy, reference=None):
        return self.params.beta * as_float(policy.logps) / as_float(policy.num_tokens)

    def pair_loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None):
        margin = self.reward(chosen) - self.reward(rejected) - self.params.gamma
        return -F.logsigmoid(margin), {}


def log_odds(avg_logp: Tensor) -> Tensor:
    """``a - log(1 - exp(a))`` for an average log-prob ``a <= 0``.

    ``log(1 - exp(a)) = log(-expm1(a))`` keeps full precision as ``a -> 0-`` (``1 - exp(a)``
    would cancel to 0) and as ``a -> -inf``. ``a`` is clamped just below 0: an average log-prob
    is never positive, and exactly 0 (certainty) has infinite odds."""
    tiny = torch.finfo(avg_logp.dtype).tiny
    a = torch.clamp(avg_logp, max=-tiny)
    return a - torch.log(-torch.expm1(a))


@dataclasses.dataclass(frozen=True)
class ORPOParams:
    odds_ratio_weight: float = 0.1
    """lambda: weight of the odds-ratio term next to the chosen NLL (alias ``lambda``)."""

    def __post_init__(self) -> None:
        if self.odds_ratio_weight < 0:
            raise ValueError(f"odds_ratio_weight (lambda) must be >= 0, got {self.odds_ratio_weight}")


class ORPOLoss(BaseLoss):
    name = "orpo"

    def __init__(self, params: ORPOParams):
        self.params = params

    def reward(self, policy, reference=None):
        return log_odds(as_float(policy.logps) / as_float(policy.num_tokens))

    def pair_loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None):
        nll = -as_float(chosen.logps) / as_float(chosen.num_tokens)
        odds_ratio = F.logsigmoid(self.reward(chosen) - self.reward(rejected))
        return nll - self.params.odds_ratio_weight * odds_ratio, {"nll": nll,
                                                                  "orpo/log_odds_ratio": odds_ratio}


BASE_LOSSES = {"dpo": (DPOLoss, DPOParams), "simpo": (SimPOLoss, SimPOParams),
               "orpo": (ORPOLoss, ORPOParams)}


class PairwiseObjective(Objective):
    """A base preference loss on one context (``dpo``, ``simpo``, ``orpo``; ``long_dpo``)."""

    def __init__(self, name: str, base: BaseLoss, context: str):
        _check_context(context)
        self.name = name
        self.base = base
        self.params = base.params
        self.context = context
        self.policy_roles = roles_for(context)
        self.reference_roles = roles_for(context) if base.needs_reference else ()

    def describe(self) -> str:
        return f"{super().describe()} on the {self.context} context"

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
class SFTParams:
    context: Context = "short"
    """Which context the chosen response is conditioned on."""

    def __post_init__(self) -> None:
        _check_context(self.context)


class SFTObjective(Objective):
    """Length-normalized NLL of the chosen response (a baseline)."""

    name = "sft"

    def __init__(self, params: SFTParams):
        self.params = params
        self.policy_roles = (Role.parse(f"{params.context}/chosen"),)

    def group_losses(self, inputs: ObjectiveInputs):
        chosen = inputs.policy[self.policy_roles[0]]
        nll = -as_float(chosen.logps) / as_float(chosen.num_tokens)
        return nll, {"nll": nll, f"{self.params.context}/logps/chosen": as_float(chosen.logps)}
