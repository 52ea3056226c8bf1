"""Preference objectives as pure functions of per-group log-prob sums (no process groups, no
Megatron). ``build_objective(name, **hyperparameters)`` is what the run config calls:

    build_objective("solopo", base="dpo", beta=0.1, alpha=3.0)
    build_objective("longpo", beta=0.1, **{"lambda": 0.01})

Names: dpo, simpo, orpo, sft, solopo (with base=dpo|simpo|orpo), longpo, long_dpo.
docs/objectives.md has every formula, default and role.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_solopo.objectives.base import Objective, ObjectiveInputs, RoleLogps
from megatron_solopo.objectives.preference import (BASE_LOSSES, PairwiseObjective, SFTObjective,
                                                   SFTParams)
from megatron_solopo.objectives.short_to_long import (DEFAULT_ALPHA, LongPOObjective,
                                                      LongPOParams, SoLoPOObjective,
                                                      SoLoPOParams)

OBJECTIVES = ("dpo", "simpo", "orpo", "sft", "solopo", "longpo", "long_dpo")

# `lambda` is a Python keyword, so the dataclass fields have descriptive names; configs may use
# the papers' letter.
_LAMBDA_FIELD = {"orpo": "odds_ratio_weight", "longpo": "preference_weight"}

__all__ = ["OBJECTIVES", "Objective", "ObjectiveInputs", "RoleLogps", "build_objective"]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _make(cls, objective: str, values: dict):
    valid = _fields(cls)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for objective {objective!r}; "
                         f"valid: {', '.join(valid)}")
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"objective {objective!r}: {err}") from None


def _rename_lambda(values: dict, algorithm: str) -> dict:
    values = dict(values)
    if "lambda" in values:
        if algorithm not in _LAMBDA_FIELD:
            raise ValueError(f"'lambda' is not a hyper-parameter of {algorithm!r}")
        values[_LAMBDA_FIELD[algorithm]] = values.pop("lambda")
    return values


def _base_loss(base: str, values: dict, objective: str):
    if base not in BASE_LOSSES:
        raise ValueError(f"{objective}: base={base!r} is not a pairwise preference loss; valid "
                         f"bases: {', '.join(BASE_LOSSES)}")
    loss_cls, params_cls = BASE_LOSSES[base]
    return loss_cls(_make(params_cls, f"{objective} (base {base})", _rename_lambda(values, base)))


def build_objective(name: str, **hyperparameters: Any) -> Objective:
    """The objective ``name`` with its hyper-parameters; ValueError lists the valid choices."""
    values = dict(hyperparameters)
    if name in ("dpo", "simpo", "orpo", "long_dpo"):
        algorithm = "dpo" if name == "long_dpo" else name
        context = values.pop("context", "long" if name == "long_dpo" else "short")
        if name == "long_dpo" and context != "long":
            raise ValueError("long_dpo is DPO on the long context; use dpo with context=short")
        return PairwiseObjective(name, _base_loss(algorithm, values, name), context)
    if name == "sft":
        return SFTObjective(_make(SFTParams, name, values))
    if name == "solopo":
        base = values.pop("base", None)
        if base is None:
            raise ValueError(f"solopo needs base=<one of {', '.join(BASE_LOSSES)}> (the preference "
                             f"loss run on the short context)")
        if base in BASE_LOSSES:
            valid = _fields(SoLoPOParams) + _fields(BASE_LOSSES[base][1]) + (
                ["lambda"] if base in _LAMBDA_FIELD else [])
            unknown = sorted(set(values) - set(valid))
            if unknown:
                raise ValueError(f"unknown hyper-parameter(s) {unknown} for objective 'solopo' "
                                 f"with base {base!r}; valid: {', '.join(valid)}")
        own = {key: values.pop(key) for key in _fields(SoLoPOParams) if key in values}
        own.setdefault("alpha", DEFAULT_ALPHA.get(base, 1.0))
        base_loss = _base_loss(base, values, name)
        return SoLoPOObjective(base_loss, _make(SoLoPOParams, name, own))
    if name == "longpo":
        return LongPOObjective(_make(LongPOParams, name, _rename_lambda(values, "longpo")))
    raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
