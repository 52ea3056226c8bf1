"""SoLoPO and LongPO: the short-to-long objectives.

SoLoPO: ``L = L_PO(x_S; y_w, y_l) + alpha * |r(x_S, y_w) - r(x_L, y_w)|`` (+ the same for ``y_l``
with ``solo_ra: both``), where ``r`` is the base loss's own reward.

LongPO: ``L = NLL(x_L, y_w) + lambda * -log sigma(beta * [(logp(y_w|x_L) - logp_ref(y_w|x_S)) -
(logp(y_l|x_L) - logp_ref(y_l|x_S))])``: the reference is the frozen model on the *short* input.
Details and choices: docs/objectives.md.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_solopo.objectives.base import (Hyperparameters, Objective, ObjectiveInputs,
                                             as_float, pair_metrics)
from megatron_solopo.objectives.preference import BaseLoss, average_logps
from megatron_solopo.roles import Role

# alpha reported for Qwen2.5-7B-Instruct: 3 with DPO, 1 with SimPO and ORPO.
DEFAULT_ALPHA = {"dpo": 3.0, "simpo": 1.0, "orpo": 1.0}


@dataclasses.dataclass(frozen=True)
class SoLoPOParams(Hyperparameters):
    alpha: float = 1.0
    """Weight of SoLo-RA, >= 0. ``build_objective`` defaults it by base (DEFAULT_ALPHA: 3 for
    DPO, 1 for SimPO and ORPO, the paper's values for Qwen2.5-7B-Instruct)."""

    solo_ra: Literal["chosen", "both"] = "chosen"
    """Align the reward of the chosen response only (the paper's method) or of both."""

    solo_ra_reference: Literal["long", "short"] = "long"
    """DPO only: the reference log-prob in the long-context reward. ``long`` uses
    ``logp_ref(y|x_L)`` (needs a long reference pass); ``short`` reuses ``logp_ref(y|x_S)``."""

    solo_ra_huber_delta: float = 0.0
    """>= 0. 0: SoLo-RA is ``|gap|`` (the default). > 0: the Huber function of the gap,
    ``gap^2 / (2 delta)`` below ``delta`` and ``|gap| - delta / 2`` above, whose gradient goes
    to 0 with the gap instead of jumping between -1 and 1. With a DPO base the gap starts at 0
    (policy == reference), where ``|.|``'s gradient sign is set by rounding differences between
    the policy's and the precomputed reference's log-probs (docs/objectives.md)."""

    def validate(self) -> None:
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not self.solo_ra_huber_delta >= 0:
            raise ValueError(f"solo_ra_huber_delta must be >= 0, got {self.solo_ra_huber_delta}")

    def alignment(self, gap: torch.Tensor) -> torch.Tensor:
        """SoLo-RA's penalty of a (signed) reward gap."""
        size = torch.abs(gap)
        delta = self.solo_ra_huber_delta
        if delta == 0:
            return size
        return torch.where(size < delta, size * size / (2 * delta), size - delta / 2)


class SoLoPOObjective(Objective):
    """A base pairwise loss on the short context plus SoLo-RA, the short-to-long alignment of
    the base's own reward of the same response."""

    name = "solopo"

    def __init__(self, base: BaseLoss, params: SoLoPOParams):
        self.base = base
        self.params = params
        responses = ("chosen", "rejected") if params.solo_ra == "both" else ("chosen",)
        self.aligned = tuple(Role.parse(f"long/{r}") for r in responses)
        self.policy_roles = (Role.SHORT_CHOSEN, Role.SHORT_REJECTED) + self.aligned
        if not base.needs_reference:
            self.reference_roles = ()
        elif params.solo_ra_reference == "short":
            self.reference_roles = (Role.SHORT_CHOSEN, Role.SHORT_REJECTED)
        else:
            self.reference_roles = self.policy_roles

    def describe(self) -> str:
        return f"solopo(base={self.base.describe()}, {self.params.summary()})"

    def _long_reference(self, inputs: ObjectiveInputs, long_role: Role) -> torch.Tensor | None:
        if not self.base.needs_reference:
            return None
        if self.params.solo_ra_reference == "short":
            return inputs.reference[Role.parse(f"short/{long_role.response}")]
        return inputs.reference[long_role]

    def group_losses(self, inputs: ObjectiveInputs):
        policy, reference = inputs.policy, inputs.reference
        short_chosen, short_rejected = policy[Role.SHORT_CHOSEN], policy[Role.SHORT_REJECTED]
        ref_chosen = reference.get(Role.SHORT_CHOSEN)
        ref_rejected = reference.get(Role.SHORT_REJECTED)
        losses, extra = self.base.pair_loss(short_chosen, short_rejected, ref_chosen, ref_rejected)
        short_rewards = {"chosen": self.base.reward(short_chosen, ref_chosen),
                         "rejected": self.base.reward(short_rejected, ref_rejected)}
        metrics = pair_metrics("short", short_rewards["chosen"], short_rewards["rejected"],
                               as_float(short_chosen.logps), as_float(short_rejected.logps))
        metrics.update(extra)
        metrics["po_loss"] = losses
        alignment = torch.zeros_like(losses)
        long_rewards = {}
        for role in self.aligned:
            long_reward = self.base.reward(policy[role], self._long_reference(inputs, role))
            long_rewards[role.response] = long_reward
            # s(.) = identity: the paper's per-algorithm s is not public (docs/objectives.md).
            signed = short_rewards[role.response] - long_reward
            gap = torch.abs(signed)
            alignment = alignment + self.params.alignment(signed)
            suffix = "" if role.response == "chosen" else "_rejected"
            metrics[f"solo_ra/gap{suffix}"] = gap
            metrics[f"long/rewards/{role.response}"] = long_reward
            metrics[f"long/logps/{role.response}"] = as_float(policy[role].logps)
        if "rejected" in long_rewards:
            metrics["long/rewards/margins"] = long_rewards["chosen"] - long_rewards["rejected"]
            metrics["long/rewards/accuracies"] = (
                long_rewards["chosen"] > long_rewards["rejected"]).to(losses.dtype)
        metrics["solo_ra/loss"] = self.params.alpha * alignment
        return losses + self.params.alpha * alignment, metrics


@dataclasses.dataclass(frozen=True)
class LongPOParams(Hyperparameters):
    beta: float = 0.1
    """Inverse temperature, > 0 (the paper: 0.1; the official launch script: 0.01)."""

    preference_weight: float = 0.01
    """lambda: weight of the short-to-long preference term, >= 0; the NLL has weight 1 (alias
    ``lambda``)."""

    nll_include_context: bool = True
    """NLL over every real token of the long chosen sequence (document, instructions, responses;
    the official code) instead of the response tokens only. Padding is always excluded."""

    nll_weight: float = 1.0
    """Weight of the NLL term, >= 0. 1 is the paper's loss (Eq. 14); 0 is its "without NLL"
    ablation (the preference term alone, still scaled by ``preference_weight``)."""

    def validate(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.nll_weight >= 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if not self.preference_weight >= 0:
            raise ValueError(f"preference_weight (lambda) must be >= 0, got "
                             f"{self.preference_weight}")


class LongPOObjective(Objective):
    """Multi-turn records arrive summed by the trainer: the policy's long sequence carries every
    turn's response in its response mask, and the reference value of a group is the sum of its
    per-turn short sequences' log-probs (the official code sums log-probs over turns)."""

    name = "longpo"
    policy_roles = (Role.LONG_CHOSEN, Role.LONG_REJECTED)
    reference_roles = (Role.SHORT_CHOSEN, Role.SHORT_REJECTED)

    def __init__(self, params: LongPOParams):
        self.params = params
        self.sequence_logps_roles = (Role.LONG_CHOSEN,) if params.nll_include_context else ()

    def group_losses(self, inputs: ObjectiveInputs):
        beta = self.params.beta
        chosen, rejected = inputs.policy[Role.LONG_CHOSEN], inputs.policy[Role.LONG_REJECTED]
        ref_chosen = as_float(inputs.reference[Role.SHORT_CHOSEN])
        ref_rejected = as_float(inputs.reference[Role.SHORT_REJECTED])
        if self.params.nll_include_context:
            nll = -as_float(chosen.sequence_logps) / as_float(chosen.sequence_num_tokens)
        else:
            nll = -average_logps(chosen)
        reward_chosen = beta * (as_float(chosen.logps) - ref_chosen)
        reward_rejected = beta * (as_float(rejected.logps) - ref_rejected)
        preference = -F.logsigmoid(reward_chosen - reward_rejected)
        metrics = pair_metrics("long", reward_chosen, reward_rejected, as_float(chosen.logps),
                               as_float(rejected.logps))
        metrics.update({"nll": nll, "longpo/preference_loss": preference})
        loss = self.params.nll_weight * nll + self.params.preference_weight * preference
        return loss, metrics
