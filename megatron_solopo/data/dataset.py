"""Reading a preprocessed preference dataset (written by data/preprocess.py; docs/data.md
"On-disk format").

Files under one prefix::

    <prefix>.bin / <prefix>.idx              Megatron-Core IndexedDataset (multimodal): one
                                             document per record, one sequence per (role, turn),
                                             the sequence mode is Role.index; token dtype uint16
                                             below 65,500 ids, else int32
    <prefix>.spans.bin / <prefix>.spans.idx  IndexedDataset (int32), same documents/sequences:
                                             the response spans of each sequence, flattened
                                             [start_0, end_0, start_1, end_1, ...] (one per turn)
    <prefix>.ids                             record ids, one JSON string per line, in order
    <prefix>.json                            the sidecar (written last: no sidecar, no dataset)
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_solopo.roles import ALL_ROLES, Role

FORMAT_NAME = "megatron-solopo-preference"
FORMAT_VERSION = 2
SPANS_SUFFIX = ".spans"
# The sidecar records each file's size so that a dataset mixed from two runs is refused.
DATA_SUFFIXES = (".bin", ".idx", SPANS_SUFFIX + ".bin", SPANS_SUFFIX + ".idx", ".ids")
SIDECAR_SUFFIX = ".json"


@dataclasses.dataclass
class PreferenceGroup:
    """One record's sequences for the requested roles.

    ``sequences[role]`` is a list of ``(token_ids int32 [L], response_mask bool [L])``: one item
    for a single-turn record, one per turn for the short roles of a multi-turn record (the long
    roles of a multi-turn record are one sequence whose mask covers every answer)."""

    index: int
    record_id: str
    sequences: dict  # dict[Role, list[tuple[np.ndarray, np.ndarray]]]


def _open_indexed(prefix: str, multimodal: bool):
    import megatron_solopo  # noqa: F401  (triton stub before megatron imports)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with warnings.catch_warnings():
        # megatron-core logs "could not determine rank" outside torch.distributed: not news here.
        warnings.filterwarnings("ignore", message="Could not determine rank")
        return IndexedDataset(prefix, multimodal=multimodal)


class PreferenceDataset:
    """``PreferenceDataset(prefix)``: ``len`` records, ``get_group(i, roles)``, ``metadata`` (the
    sidecar), compatibility checks against the run's tokenizer and model."""

    def __init__(self, path_prefix: str):
        self.path_prefix = str(path_prefix)
        sidecar = Path(self.path_prefix + SIDECAR_SUFFIX)
        if not sidecar.exists():
            raise ValueError(f"dataset {self.path_prefix}: {sidecar} not found (is the prefix the "
                             f"--output-prefix of tools/preprocess_data.py, and did it finish?)")
        with open(sidecar) as handle:
            self.metadata: dict = json.load(handle)
        if self.metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{sidecar}: not a megatron-solopo preference dataset")
        if self.metadata.get("version") != FORMAT_VERSION:
            raise ValueError(f"{sidecar}: format version {self.metadata.get('version')}, this code "
                             f"reads version {FORMAT_VERSION}; re-run tools/preprocess_data.py")
        for suffix, size in self.metadata["files"].items():
            path = self.path_prefix + suffix
            if not os.path.exists(path) or os.path.getsize(path) != size:
                raise ValueError(f"dataset {self.path_prefix}: {path} is missing or is not the file "
                                 f"this sidecar describes ({size} bytes); re-run "
                                 f"tools/preprocess_data.py")
        self.tokens = _open_indexed(self.path_prefix, multimodal=True)
        self.spans = _open_indexed(self.path_prefix + SPANS_SUFFIX, multimodal=False)
        with open(self.path_prefix + ".ids") as handle:
            self.record_ids: list[str] = [json.loads(line) for line in handle]
        self.document_indices = np.asarray(self.tokens.document_indices)
        # IndexedDataset.sequence_modes asserts on a numpy array (megatron-core 0.19.2): read the index.
        self.sequence_roles = np.asarray(self.tokens.index.sequence_modes)
        num_documents = len(self.document_indices) - 1
        if not num_documents == len(self.record_ids) == self.metadata["num_records"]:
            raise ValueError(f"dataset {self.path_prefix}: {num_documents} documents, "
                             f"{len(self.record_ids)} record ids, sidecar says "
                             f"{self.metadata['num_records']} records")

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def roles(self) -> list[Role]:
        """The roles every record has (what an objective may ask for)."""
        counts = self.metadata["roles"]
        return [role for role in ALL_ROLES if counts.get(role.value, 0) == len(self)]

    def record_id(self, index: int) -> str:
        return self.record_ids[index]

    def get_group(self, index: int, roles: Sequence[Role]) -> "PreferenceGroup":
        """Record ``index``'s sequences for ``roles``; a role it lacks is a ValueError."""
        sequences: dict = {role: [] for role in roles}
        start, end = int(self.document_indices[index]), int(self.document_indices[index + 1])
        for position in range(start, end):
            role = Role.from_index(int(self.sequence_roles[position]))
            if role not in sequences:
                continue
            # A multimodal IndexedDataset item is (array, mode); the mode is the role.
            tokens = np.asarray(self.tokens[position][0], dtype=np.int32)
            mask = np.zeros(len(tokens), dtype=bool)
            bounds = self.spans[position]
            for span_start, span_end in zip(bounds[0::2], bounds[1::2]):
                mask[span_start:span_end] = True
            sequences[role].append((tokens, mask))
        missing = [str(role) for role, items in sequences.items() if not items]
        if missing:
            raise ValueError(f"dataset {self.path_prefix}: record {self.record_ids[index]!r} has no "
                             f"{', '.join(missing)} sequence (its context is missing, or "
                             f"--roles left it out); the objective needs it")
        return PreferenceGroup(index, self.record_ids[index], sequences)

    def sequence_lengths(self, index: int, roles: Sequence[Role]) -> list[int]:
        """Lengths of record ``index``'s sequences of ``roles`` from the index (no token read)."""
        start, end = int(self.document_indices[index]), int(self.document_indices[index + 1])
        wanted = {role.index for role in roles}
        lengths = self.tokens.sequence_lengths
        return [int(lengths[p]) for p in range(start, end) if int(self.sequence_roles[p]) in wanted]

    def group_sizes(self, roles: Sequence[Role], pad_multiple: int) -> np.ndarray:
        """Every record's packed size for ``roles``: the sum of its sequences' lengths, each
        padded to ``pad_multiple`` (as packing.pack_groups pads them), from the index alone."""
        lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        padded = -(-lengths // pad_multiple) * pad_multiple
        wanted = np.isin(self.sequence_roles, [role.index for role in roles])
        per_sequence = np.where(wanted, padded, 0)
        starts = self.document_indices[:-1]
        sums = np.add.reduceat(per_sequence, starts) if len(per_sequence) else np.zeros(0, np.int64)
        return np.where(self.document_indices[1:] > starts, sums, 0)

    # -- checks done once when training starts ----------------------------------------------------
    def check_roles(self, roles: Sequence[Role]) -> None:
        """Every record must have every role the objective needs."""
        counts = self.metadata["roles"]
        lacking = {str(role): len(self) - counts.get(role.value, 0) for role in roles
                   if counts.get(role.value, 0) < len(self)}
        if lacking:
            details = ", ".join(f"{count} record(s) lack {role}" for role, count in lacking.items())
            raise ValueError(f"dataset {self.path_prefix}: {details}; the objective needs these "
                             f"roles (add the missing contexts, or choose an objective that "
                             f"does not need them)")

    def check_tokenizer(self, name_or_fingerprint: str, vocab_size: int) -> None:
        """The dataset was made with this tokenizer: ``name_or_fingerprint`` equals the sidecar's
        fingerprint (sha256 of the tokenizer files) or its name, and the vocab sizes agree."""
        described = self.metadata["tokenizer"]
        if name_or_fingerprint not in (described["fingerprint"], described["name"]):
            raise ValueError(
                f"dataset {self.path_prefix} was tokenized with {described['name']} (fingerprint "
                f"{described['fingerprint'][:16]}), not with {name_or_fingerprint[:64]}; re-run "
                f"tools/preprocess_data.py with the model's tokenizer")
        if int(vocab_size) != int(described["vocab_size"]):
            raise ValueError(f"dataset {self.path_prefix}: tokenizer vocabulary {described['vocab_size']}"
                             f" in the sidecar, {vocab_size} given")

    def _tokenizer_mismatch(self, tokenizer_model: str, source: str) -> str:
        """Why the run's tokenizer cannot even be loaded as the dataset's kind, in config terms."""
        described = self.metadata["tokenizer"]
        path = Path(tokenizer_model)
        made_with = (f"dataset {self.path_prefix} was made with the {described['type']} "
                     f"{described['name']}")
        if not path.exists():
            return (f"{source}={tokenizer_model} does not exist; {made_with}: point {source} at "
                    f"that tokenizer (a placeholder path in an example config must be replaced)")
        if path.is_dir() and any((path / name).exists() for name in
                                 ("tokenizer.json", "tokenizer_config.json")):
            kind = "a Hugging Face tokenizer directory"
        elif path.is_file() and path.suffix == ".model":
            kind = "a SentencePiece model file"
        else:
            kind = "neither a SentencePiece .model file nor a Hugging Face tokenizer directory"
        return (f"the dataset and the model use different tokenizers: {made_with}, but {source}="
                f"{tokenizer_model} is {kind}; re-run tools/preprocess_data.py with the model's "
                f"tokenizer, or set {source} to the dataset's")

    def check_compatible(self, tokenizer_model: Optional[str], model_vocab_size: int,
                         source: str = "tokenizer.tokenizer_model") -> None:
        """Refuse a dataset made with another tokenizer, or with ids the model cannot embed.

        - ``tokenizer_model``: the run's tokenizer (config ``tokenizer.tokenizer_model``, loaded
          with the sidecar's tokenizer type); its fingerprint must equal the sidecar's. ``None``
          skips this check.
        - ``model_vocab_size``: the model's *unpadded* vocabulary (``model.vocab_size``: the
          embedding rows that are real tokens; HF checkpoints often round it up above the
          tokenizer's, which is fine). Compatible means ``sidecar vocab_size <= model_vocab_size``.
          The rows Megatron adds to reach a multiple of ``make_vocab_size_divisible_by * TP`` do
          not count: log-probs mask them out, so an id there could never be a target."""
        described = self.metadata["tokenizer"]
        if tokenizer_model:
            from megatron_solopo.data.tokenizers import build_tokenizer

            try:
                tokenizer = build_tokenizer(described["type"], tokenizer_model)
            except ValueError:
                raise ValueError(self._tokenizer_mismatch(tokenizer_model, source)) from None
            if tokenizer.fingerprint() != described["fingerprint"]:
                raise ValueError(
                    f"dataset {self.path_prefix} was tokenized with {described['name']} "
                    f"(fingerprint {described['fingerprint'][:16]}), not with the run's tokenizer "
                    f"{tokenizer_model} (fingerprint {tokenizer.fingerprint()[:16]}); re-run "
                    f"tools/preprocess_data.py with the model's tokenizer")
        if int(self.metadata["vocab_size"]) > model_vocab_size:
            raise ValueError(
                f"dataset {self.path_prefix} uses a vocabulary of {self.metadata['vocab_size']} "
                f"tokens ({described['name']}) but the model embeds only {model_vocab_size}: "
                f"the tokenizer does not match the model")
