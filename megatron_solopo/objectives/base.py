"""Objective inputs and the Objective interface.

An objective maps per-group log-prob sums to a loss and metrics. It is pure torch: no process
groups, no Megatron. Shapes: ``[G]``, one value per preference group in this call (a micro-batch).

Normalization contract (the trainer relies on it): the loss is
``sum over the groups of this call of L_g / num_groups`` where ``num_groups`` counts the groups
of the *global* batch, and every metric is likewise ``sum of the per-group value / num_groups``.
So summing losses and metrics over micro-batches and data-parallel ranks gives global-batch means,
however the batch was split.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional, Union

import torch
from torch import Tensor



@dataclasses.dataclass
class RoleLogps:
    """Per-group log-prob sums of one role (fp32, or fp64 in tests). Shape ``[G]``.

    A role with several sequences in a group (LongPO multi-turn references) arrives already
    summed over them: the trainer sums per (group, role).
    """

    logps: Tensor  # sum over response tokens of token log-probs: logp(y | x)
    num_tokens: Tensor  # number of response tokens (> 0)
    sequence_logps: Optional[Tensor] = None  # sum over every real target token (context + response)
    sequence_num_tokens: Optional[Tensor] = None


@dataclasses.dataclass
class ObjectiveInputs:
    policy: dict  # Role -> RoleLogps, with autograd
    reference: dict  # Role -> Tensor [G] reference logp(y | x); empty when reference-free
    num_groups: Union[float, Tensor]  # preference groups in the GLOBAL batch


def as_float(tensor: Tensor) -> Tensor:
    """fp32 for the math whatever the compute precision; fp64 stays fp64 (gradcheck)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


class Objective(abc.ABC):
    name: str = ""
    policy_roles: tuple = ()
    reference_roles: tuple = ()
    sequence_logps_roles: tuple = ()

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_roles)

    def describe(self) -> str:
        """One line for logs."""
        params = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.params).items())
        return f"{self.name}({params})"

    @abc.abstractmethod
    def group_losses(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict]:
        """Per-group loss ``[G]`` and per-group metric values ``{name: [G]}``."""

    def __call__(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict]:
        self.check_inputs(inputs)
        losses, values = self.group_losses(inputs)
        num_groups = inputs.num_groups
        loss = losses.sum() / num_groups
        metrics = {name: (value.detach().sum() / num_groups) for name, value in values.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    def check_inputs(self, inputs: ObjectiveInputs) -> None:
        for role in self.policy_roles:
            if role not in inputs.policy:
                raise ValueError(f"objective {self.name!r} needs policy log-probs for role "
                                 f"{role}; got roles {sorted(str(r) for r in inputs.policy)}")
        for role in self.sequence_logps_roles:
            if inputs.policy[role].sequence_logps is None:
                raise ValueError(f"objective {self.name!r} needs whole-sequence log-probs "
                                 f"(sequence_logps) for role {role}")
        for role in self.reference_roles:
            if role not in inputs.reference:
                raise ValueError(f"objective {self.name!r} needs reference log-probs for role "
                                 f"{role}; got roles {sorted(str(r) for r in inputs.reference)}")
        if float(inputs.num_groups) <= 0:
            raise ValueError(f"num_groups must be positive, got {float(inputs.num_groups)}")


def pair_metrics(prefix: str, reward_chosen: Tensor, reward_rejected: Tensor,
                 logps_chosen: Tensor, logps_rejected: Tensor) -> dict:
    """TRL's metric names for one context. Accuracy of a group: 1 when the chosen reward is
    strictly above the rejected one (a tie counts as wrong, as in TRL)."""
    return {
        f"{prefix}/rewards/chosen": reward_chosen,
        f"{prefix}/rewards/rejected": reward_rejected,
        f"{prefix}/rewards/margins": reward_chosen - reward_rejected,
        f"{prefix}/rewards/accuracies": (reward_chosen > reward_rejected).to(reward_chosen.dtype),
        f"{prefix}/logps/chosen": logps_chosen,
        f"{prefix}/logps/rejected": logps_rejected,
    }
