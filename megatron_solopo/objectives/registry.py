"""``build_objective(name, **hyperparameters)``: the objective the run config names.

Hyper-parameters arrive as the config's ``objective`` mapping minus ``name``. Unknown names,
unknown keys and invalid values raise ValueError listing the valid choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from megatron_solopo.objectives.base import Hyperparameters, Objective
from megatron_solopo.objectives.preference import (BASE_LOSSES, CONTEXTS, PairwiseObjective,
                                                   SFTObjective, SFTParams)
from megatron_solopo.objectives.short_to_long import (DEFAULT_ALPHA, LongPOObjective,
                                                      LongPOParams, SoLoPOObjective,
                                                      SoLoPOParams)

OBJECTIVES = ("dpo", "simpo", "orpo", "sft", "solopo", "longpo", "long_dpo")

# `lambda` is a Python keyword, so the dataclass fields have descriptive names; configs may use
# the papers' letter.
_LAMBDA_FIELD = {"orpo": "odds_ratio_weight", "longpo": "preference_weight"}


def parameter_names(params_cls: type, algorithm: str) -> list[str]:
    """The keys ``params_cls`` accepts, with the ``lambda`` alias where the paper uses it."""
    names = [field.name for field in dataclasses.fields(params_cls)]
    if algorithm in _LAMBDA_FIELD:
        names.append("lambda")
    return names


def _unknown(values: Mapping, valid: list[str], where: str) -> None:
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown hyper-parameter(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(valid)}")


def _params(params_cls: type, algorithm: str, values: Mapping, where: str) -> Hyperparameters:
    values = dict(values)
    _unknown(values, parameter_names(params_cls, algorithm), where)
    alias = None
    if "lambda" in values:
        field = _LAMBDA_FIELD[algorithm]
        if field in values:
            raise ValueError(f"{where}: give lambda or {field} (the same parameter), not both")
        values[field] = values.pop("lambda")
        alias = field
    try:
        return params_cls(**values)
    except ValueError as err:
        message = str(err)
        if alias and message.startswith(alias) and not message.startswith(f"{alias} (lambda)"):
            message = f"lambda ({alias})" + message[len(alias):]  # the name the user wrote
        raise ValueError(f"{where}: {message}") from None


def _base_loss(base: str, values: Mapping, where: str):
    loss_cls, params_cls = BASE_LOSSES[base]
    return loss_cls(_params(params_cls, base, values, where))


def _pairwise(name: str, values: dict) -> Objective:
    algorithm = "dpo" if name == "long_dpo" else name
    valid = parameter_names(BASE_LOSSES[algorithm][1], algorithm) + ["context"]
    _unknown(values, valid, f"objective {name!r}")
    context = values.pop("context", "long" if name == "long_dpo" else "short")
    if name == "long_dpo" and context != "long":
        raise ValueError("objective 'long_dpo' is DPO on the long context; for DPO on the short "
                         "context use name: dpo")
    if context not in CONTEXTS:
        raise ValueError(f"objective {name!r}: context={context!r} is not valid; valid: "
                         f"{', '.join(CONTEXTS)}")
    return PairwiseObjective(name, _base_loss(algorithm, values, f"objective {name!r}"), context)


def _solopo(values: dict) -> Objective:
    bases = ", ".join(BASE_LOSSES)
    base = values.pop("base", None)
    nested: dict = {}
    if isinstance(base, Mapping):  # base: {name: dpo, beta: 0.1}
        nested = dict(base)
        base = nested.pop("name", None)
    if base is None:
        raise ValueError(f"objective 'solopo' needs base=<one of {bases}> (the preference loss "
                         f"run on the short context), e.g. base: dpo or base: {{name: dpo, "
                         f"beta: 0.1}}")
    if not isinstance(base, str) or base not in BASE_LOSSES:
        raise ValueError(f"objective 'solopo': base={base!r} is not a pairwise preference loss; "
                         f"valid bases: {bases}")
    own_names = [field.name for field in dataclasses.fields(SoLoPOParams)]
    base_names = parameter_names(BASE_LOSSES[base][1], base)
    _unknown(values, ["base"] + own_names + base_names,
             f"objective 'solopo' with base {base!r}")
    _unknown(nested, ["name"] + base_names, f"objective 'solopo': base {base!r}")
    both = sorted(set(nested) & set(values))
    if both:
        raise ValueError(f"objective 'solopo': {', '.join(both)} given both at the top level and "
                         f"inside base; keep one")
    own = {key: values.pop(key) for key in own_names if key in values}
    own.setdefault("alpha", DEFAULT_ALPHA[base])
    base_loss = _base_loss(base, {**values, **nested}, f"objective 'solopo' (base {base!r})")
    return SoLoPOObjective(base_loss, _params(SoLoPOParams, "solopo", own, "objective 'solopo'"))


def build_objective(name: str, **hyperparameters: Any) -> Objective:
    """The objective ``name`` with its hyper-parameters; ValueError lists the valid choices.

    ``build_objective("solopo", base="dpo", alpha=3.0, beta=0.1)`` and
    ``build_objective("solopo", base={"name": "dpo", "beta": 0.1}, alpha=3.0)`` are the same.
    """
    values = dict(hyperparameters)
    if name in ("dpo", "simpo", "orpo", "long_dpo"):
        return _pairwise(name, values)
    if name == "sft":
        return SFTObjective(_params(SFTParams, name, values, "objective 'sft'"))
    if name == "solopo":
        return _solopo(values)
    if name == "longpo":
        return LongPOObjective(_params(LongPOParams, name, values, "objective 'longpo'"))
    raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
