"""Files on the Hugging Face side: lazy safetensors reading, sharded safetensors writing, tokenizer
files, and the write-to-a-temporary-directory-then-rename rule for every conversion output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Union

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokenizer files (any that exist are copied), and generation_config.json, which is not a
# tokenizer file but travels with them so it is there when the model goes back to Hugging Face.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
COMPANION_FILES = ("generation_config.json",)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a ValueError naming the file and position otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class SafetensorsReader:
    """Lazy access to a (sharded or not) safetensors checkpoint: a tensor is read from its file
    only when asked for, so a converter holds one tensor at a time, not the whole model."""

    def __init__(self, directory: Union[str, Path]):
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' mapping tensor names to files")
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise ValueError(f"--hf-dir {directory}: no {SINGLE_FILE} or {INDEX_FILE} (only "
                             f"safetensors checkpoints are read; re-save .bin checkpoints with "
                             f"save_pretrained(safe_serialization=True))")
        for name in files:
            if not (directory / name).exists():
                raise ValueError(f"{index}: lists {name}, which is missing")
        self.handles = {}
        for name in files:
            try:
                self.handles[name] = safe_open(str(directory / name), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError
                raise ValueError(f"{directory / name}: not a readable safetensors file ({err})") from None
        self.location = {key: name for name, handle in self.handles.items() for key in handle.keys()}
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.location))
            if missing:
                raise ValueError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")

    def names(self) -> list[str]:
        return sorted(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple:
        return tuple(self.handles[self.location[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise ValueError(f"tensor {name!r} is missing from the Hugging Face checkpoint")
        return self.handles[self.location[name]].get_tensor(name)


def parse_size(text: Union[str, int]) -> int:
    """'5GB', '500MB', '2GiB', '150KB' or a byte count."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    for suffix, factor in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9),
                           ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if value.endswith(suffix):
            number = value[:-len(suffix)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count") from None
    if size < 1:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return size


class ShardedSafetensorsWriter:
    """Writes tensors as they come into safetensors files of at most ``max_bytes`` each (a larger
    single tensor gets a file of its own), then names them as ``save_pretrained`` does:
    ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + the index. Holds at most one
    file's worth of tensors."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.pending, name
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().nbytes() != size:
            tensor = tensor.clone()  # a view (e.g. unpadded vocabulary rows): write only its bytes
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f".part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Final names of the files written."""
        self.flush()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0][0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for index, (part, tensors) in enumerate(self.files):
            final = f"model-{index + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.directory / part, self.directory / final)
            weight_map.update({tensor: final for tensor in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` (a directory, or a SentencePiece ``.model``
    file) into ``target``; returns the names copied."""
    if source.is_file():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / "tokenizer.model")
        return ["tokenizer.model"]
    copied = []
    for name in TOKENIZER_FILES + COMPANION_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(output: Union[str, Path], flag: str = "--output") -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``output``, renamed to ``output`` on success and
    removed on any failure, so a failed conversion leaves nothing behind."""
    output = Path(output).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{flag} {output} exists and is not an empty directory; choose a new one")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
