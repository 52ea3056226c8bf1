"""Roles: which (context, response) sequence of a preference record a tensor belongs to.

A role is a pair of a context kind (``short`` or ``long``) and a response kind (``chosen`` or
``rejected``). Objectives declare the roles they need from the policy and from the reference;
the data pipeline packs exactly those; the trainer sums per-sequence log-probs into one value
per (preference group, role). This module is plain Python so every layer can import it.
"""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    SHORT_CHOSEN = "short/chosen"
    SHORT_REJECTED = "short/rejected"
    LONG_CHOSEN = "long/chosen"
    LONG_REJECTED = "long/rejected"

    @property
    def context(self) -> str:
        """``"short"`` or ``"long"``."""
        return self.value.split("/")[0]

    @property
    def response(self) -> str:
        """``"chosen"`` or ``"rejected"``."""
        return self.value.split("/")[1]

    @property
    def index(self) -> int:
        """Stable integer id, used as the per-sequence role tag in packed micro-batches."""
        return ALL_ROLES.index(self)

    @classmethod
    def from_index(cls, index: int) -> "Role":
        return ALL_ROLES[index]

    @classmethod
    def parse(cls, name: str) -> "Role":
        """``Role.parse("short/chosen")``; raises ValueError listing the valid names."""
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(r.value for r in ALL_ROLES)
            raise ValueError(f"unknown role {name!r}; valid roles: {valid}") from None

    def __str__(self) -> str:  # "short/chosen", not "Role.SHORT_CHOSEN"
        return self.value


ALL_ROLES: tuple[Role, ...] = (
    Role.SHORT_CHOSEN,
    Role.SHORT_REJECTED,
    Role.LONG_CHOSEN,
    Role.LONG_REJECTED,
)
