"""Objective inputs, hyper-parameter validation and the Objective interface.

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
import math
import typing
from typing import Literal

import torch
from torch import Tensor

from megatron_solopo.roles import Role


@dataclasses.dataclass
class RoleLogps:
    """Per-group log-prob sums of one role. All tensors fp32 (or fp64 in tests), shape ``[G]``.

    A role with several sequences in a group (LongPO multi-turn references) arrives already
    summed over them: the trainer sums per (group, role).
    """

    logps: Tensor  # [G] sum over response tokens of token log-probs: logp(y|x)
    num_tokens: Tensor  # [G] number of response tokens (> 0)
    sequence_logps: Tensor | None = None  # [G] sum over ALL real targets (context + response)
    sequence_num_tokens: Tensor | None = None  # [G]; both only for sequence_logps_roles


@dataclasses.dataclass
class ObjectiveInputs:
    policy: dict[Role, RoleLogps]  # with autograd
    reference: dict[Role, Tensor]  # [G] reference logp(y|x) sums; empty when reference-free
    num_groups: float | Tensor  # groups in the GLOBAL batch (all micro-batches, DP ranks)


def as_float(tensor: Tensor) -> Tensor:
    """fp32 for the math whatever the compute precision; fp64 stays fp64 (gradcheck)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------
def _coerce(name: str, value, annotation):
    """The value as the field's declared type, or a ValueError that says what to write.

    Config values arrive untyped from YAML and dotted overrides: YAML 1.1 reads ``1e-2`` as a
    string and ``3`` as an int, so numeric strings and ints become floats here."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not valid; valid: {', '.join(choices)}")
        return value
    if annotation is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(number)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    raise AssertionError(f"no coercion for {name}: {annotation}")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Frozen hyper-parameters of one objective: fields are coerced to their declared type, then
    ``validate`` checks their ranges."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _coerce(field.name, getattr(self, field.name), hints[field.name])
            object.__setattr__(self, field.name, value)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for values out of range."""

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------
class Objective(abc.ABC):
    name: str = ""
    policy_roles: tuple[Role, ...] = ()  # roles whose policy log-probs are needed
    reference_roles: tuple[Role, ...] = ()  # roles whose reference log-probs are needed
    sequence_logps_roles: tuple[Role, ...] = ()  # roles that need RoleLogps.sequence_logps
    params: Hyperparameters

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_roles)

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.name}({self.params.summary()})"

    @abc.abstractmethod
    def group_losses(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-group loss ``[G]`` and per-group metric values ``{name: [G]}``."""

    def __call__(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
        self.check_inputs(inputs)
        losses, values = self.group_losses(inputs)
        num_groups = inputs.num_groups
        loss = losses.sum() / num_groups
        metrics = {name: value.detach().sum() / num_groups for name, value in values.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    def check_inputs(self, inputs: ObjectiveInputs) -> None:
        """Roles present and every tensor ``[G]`` with the same ``G``; no device sync."""
        tensors: dict[str, Tensor | None] = {}
        for role in self.policy_roles:
            if role not in inputs.policy:
                raise ValueError(f"objective {self.name!r} needs policy log-probs for role "
                                 f"{role}; got roles {sorted(str(r) for r in inputs.policy)}")
            values = inputs.policy[role]
            tensors[f"policy {role} logps"] = values.logps
            tensors[f"policy {role} num_tokens"] = values.num_tokens
        for role in self.sequence_logps_roles:
            values = inputs.policy[role]
            if values.sequence_logps is None or values.sequence_num_tokens is None:
                raise ValueError(f"objective {self.name!r} needs whole-sequence log-probs "
                                 f"(sequence_logps and sequence_num_tokens) for role {role}")
            tensors[f"policy {role} sequence_logps"] = values.sequence_logps
            tensors[f"policy {role} sequence_num_tokens"] = values.sequence_num_tokens
        for role in self.reference_roles:
            if role not in inputs.reference:
                raise ValueError(f"objective {self.name!r} needs reference log-probs for role "
                                 f"{role}; got roles {sorted(str(r) for r in inputs.reference)}")
            tensors[f"reference {role}"] = inputs.reference[role]
        shapes = {label: tuple(tensor.shape) for label, tensor in tensors.items()}
        first_label, first_shape = next(iter(shapes.items()))
        for label, shape in shapes.items():
            if len(shape) != 1 or shape != first_shape:
                raise ValueError(f"objective {self.name!r}: every input must have shape [G] (one "
                                 f"value per group); {label} has {list(shape)}, {first_label} "
                                 f"has {list(first_shape)}")
        num_groups = inputs.num_groups
        if isinstance(num_groups, Tensor):
            if num_groups.numel() != 1:  # its value is not read: that would sync the device
                raise ValueError(f"num_groups must be a scalar, got shape {list(num_groups.shape)}")
        elif not num_groups > 0:
            raise ValueError(f"num_groups (groups in the global batch) must be > 0, got "
                             f"{num_groups}")


def pair_metrics(prefix: str, reward_chosen: Tensor, reward_rejected: Tensor,
                 logps_chosen: Tensor, logps_rejected: Tensor) -> dict[str, Tensor]:
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
