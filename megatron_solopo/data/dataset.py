"""Reading a preprocessed preference dataset (format: data/preprocess.py, docs/data.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_solopo.data.preprocess import FORMAT_NAME, MASK_SUFFIX
from megatron_solopo.roles import Role


@dataclasses.dataclass
class PreferenceGroup:
    """One record's sequences for the requested roles: ``sequences[role]`` is a list of
    ``(token_ids int64 [L], response_mask bool [L])`` (one per turn; one for single-turn)."""

    index: int
    record_id: str
    sequences: dict


class PreferenceDataset:
    def __init__(self, path_prefix: str):
        import megatron_solopo  # noqa: F401  (triton stub before megatron imports)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path_prefix = str(path_prefix)
        sidecar = Path(f"{self.path_prefix}.json")
        if not sidecar.exists():
            raise ValueError(f"dataset {self.path_prefix}: {sidecar} not found (is it the "
                             f"--output-prefix of tools/preprocess_data.py?)")
        with open(sidecar) as handle:
            self.metadata = json.load(handle)
        if self.metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{sidecar}: not a megatron-solopo preference dataset")
        self.record_ids: list[str] = self.metadata.pop("record_ids")
        self.tokens = IndexedDataset(self.path_prefix, multimodal=True)
        self.masks = IndexedDataset(self.path_prefix + MASK_SUFFIX, multimodal=True)
        self.document_indices = np.asarray(self.tokens.document_indices)
        # IndexedDataset.sequence_modes asserts on a numpy array (megatron-core 0.19.2): read the index.
        self.sequence_roles = np.asarray(self.tokens.index.sequence_modes)
        if len(self.document_indices) - 1 != len(self.record_ids):
            raise ValueError(f"dataset {self.path_prefix}: {len(self.document_indices) - 1} "
                             f"documents but {len(self.record_ids)} record ids")

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def roles(self) -> list[Role]:
        return [Role.parse(name) for name in self.metadata["roles"]]

    def record_id(self, index: int) -> str:
        return self.record_ids[index]

    def _sequence_range(self, index: int) -> range:
        return range(int(self.document_indices[index]), int(self.document_indices[index + 1]))

    def get_group(self, index: int, roles: Sequence[Role]) -> PreferenceGroup:
        sequences: dict = {role: [] for role in roles}
        for position in self._sequence_range(index):
            role = Role.from_index(int(self.sequence_roles[position]))
            if role in sequences:
                # A multimodal IndexedDataset item is (array, mode); the mode is the role.
                tokens = np.asarray(self.tokens[position][0], dtype=np.int64)
                mask = np.asarray(self.masks[position][0]).astype(bool)
                sequences[role].append((tokens, mask))
        missing = [str(role) for role, items in sequences.items() if not items]
        if missing:
            raise ValueError(f"dataset {self.path_prefix}: record {self.record_ids[index]!r} has no "
                             f"{', '.join(missing)} sequence (its context is missing); the objective "
                             f"needs it")
        return PreferenceGroup(index, self.record_ids[index], sequences)

    def check_roles(self, roles: Sequence[Role]) -> None:
        """Every record must have every role the objective needs (checked once, at set-up)."""
        counts = self.metadata.get("roles", {})
        lacking = {str(role): len(self) - counts.get(role.value, 0) for role in roles
                   if counts.get(role.value, 0) < len(self)}
        if lacking:
            details = ", ".join(f"{count} record(s) lack {role}" for role, count in lacking.items())
            raise ValueError(f"dataset {self.path_prefix}: {details}; the objective needs these "
                             f"roles (add the missing contexts, or choose an objective that "
                             f"does not need them)")

    def check_compatible(self, tokenizer_model: Optional[str], model_vocab_size: int) -> None:
        """Refuse a dataset tokenized with another tokenizer, or with ids the model cannot embed.

        ``tokenizer_model``: the run's tokenizer (config ``tokenizer.tokenizer_model``); its files
        must be the ones the dataset was made with. ``model_vocab_size``: the model's unpadded
        vocabulary, which may exceed the tokenizer's (HF checkpoints often round it up)."""
        described = self.metadata["tokenizer"]
        if tokenizer_model:
            from megatron_solopo.data.tokenizers import build_tokenizer

            tokenizer = build_tokenizer(described["type"], tokenizer_model)
            if tokenizer.fingerprint() != described["fingerprint"]:
                raise ValueError(
                    f"dataset {self.path_prefix} was tokenized with {described['name']} "
                    f"(fingerprint {described['fingerprint'][:12]}), not with the run's tokenizer "
                    f"{tokenizer_model} (fingerprint {tokenizer.fingerprint()[:12]}); re-run "
                    f"tools/preprocess_data.py with the model's tokenizer")
        if int(self.metadata["vocab_size"]) > model_vocab_size:
            raise ValueError(
                f"dataset {self.path_prefix} uses a vocabulary of {self.metadata['vocab_size']} "
                f"tokens ({described['name']}) but the model embeds only {model_vocab_size}: "
                f"the tokenizer does not match the model")
