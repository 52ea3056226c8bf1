"""Preference objectives as pure functions of per-group log-prob sums (no process groups, no
Megatron). ``build_objective(name, **hyperparameters)`` is what the run config calls:

    build_objective("solopo", base="dpo", beta=0.1, alpha=3.0)
    build_objective("solopo", base={"name": "orpo", "lambda": 0.1}, alpha=1.0)
    build_objective("longpo", beta=0.1, **{"lambda": 0.01})

Names: dpo, simpo, orpo, sft, solopo (with base=dpo|simpo|orpo), longpo, long_dpo.
docs/objectives.md has every formula, default, role and metric.
"""

from megatron_solopo.objectives.base import Objective, ObjectiveInputs, RoleLogps
from megatron_solopo.objectives.registry import OBJECTIVES, build_objective

__all__ = ["OBJECTIVES", "Objective", "ObjectiveInputs", "RoleLogps", "build_objective"]
