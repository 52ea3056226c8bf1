"""Any of our checkpoints (converted ``release`` or a trainer's ``iter_*``, saved under any
layout) -> a Hugging Face directory: safetensors (sharded at ``max_shard_size``), config.json,
tokenizer files.

The checkpoint is read one canonical key at a time (a request for the whole tensor reshards
whatever layout wrote it; optimizer state is never read) and written out shard by shard, so peak
memory is the largest key (SwiGLU fc1 of all layers, ~45% of a Llama model) plus one output shard.
Files therefore hold tensors key by key (all layers' q/k/v, then all o_proj, ...); the index maps
every name to its file, which is all loaders use. The vocabulary is unpadded; tensors keep the
checkpoint's dtype unless ``dtype`` asks for another.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_solopo.convert.hf_config import DTYPES, hf_config_from_model
from megatron_solopo.convert.hf_io import (ShardedSafetensorsWriter, atomic_output_dir,
                                           copy_tokenizer_files, parse_size)
from megatron_solopo.convert.sharded import (check_checkpoint_matches, checkpoint_tensors,
                                             load_whole, single_process_group)
from megatron_solopo.convert.weights import EMBEDDING, canonical_tensors, from_canonical
from megatron_solopo.model.config import ModelConfig

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _tokenizer_source(run_config: dict, checkpoint: Path, tokenizer_dir: Optional[str]) -> Optional[Path]:
    """Where the tokenizer files are: ``tokenizer_dir`` if given, else the run's recorded
    tokenizer, else the ``tokenizer/`` directory a conversion put beside the checkpoint."""
    if tokenizer_dir:
        path = Path(tokenizer_dir)
        if not path.exists():
            raise ValueError(f"--tokenizer-dir {tokenizer_dir} does not exist")
        return path
    recorded = (run_config.get("tokenizer") or {}).get("tokenizer_model")
    for candidate in ([Path(recorded)] if recorded else []) + [checkpoint.parent / "tokenizer"]:
        if candidate.exists():
            return candidate
    return None


def _last_line(err: BaseException) -> str:
    """The cause at the end of an error that embeds tracebacks (torch's CheckpointException)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _read_finite(directory: Path, key: str, saved: dict) -> torch.Tensor:
    """One whole weight; a missing or truncated shard file, or NaN/Inf values, refused by name."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        whole = load_whole(directory, key, saved)
    # EOFError, FileNotFoundError, megatron's CheckpointingException, and torch's
    # CheckpointException (a BaseException) that wraps each rank's traceback.
    except (Exception, CheckpointException) as err:
        raise ValueError(f"{directory}: cannot read weight {key!r} ({type(err).__name__}: "
                         f"{_last_line(err)}); a shard file is missing or damaged") from None
    if whole.is_floating_point() and not bool(torch.isfinite(whole).all()):
        count = int((~torch.isfinite(whole)).sum())
        raise ValueError(f"{directory}: weight {key!r} holds {count} NaN/Inf value(s) of "
                         f"{whole.numel()}; refusing to export a diverged checkpoint")
    return whole


def _by_key(entries: list) -> dict[str, list]:
    """Canonical entries grouped by key, keys in first-appearance (Hugging Face file) order."""
    groups: dict[str, list] = {}
    for entry in entries:
        groups.setdefault(entry.key, []).append(entry)
    return groups


def megatron_to_hf(megatron_dir: Union[str, Path], output: Union[str, Path], *,
                   max_shard_size: Union[str, int] = "5GB", dtype: Optional[str] = None,
                   tokenizer_dir: Optional[str] = None) -> Path:
    """Convert the checkpoint at ``megatron_dir`` (a save root, or an ``iter_*``/``release``
    directory) into a Hugging Face directory at ``output``."""
    from megatron_solopo.training import checkpoint as ckpt

    directory = ckpt.resolve_checkpoint(megatron_dir)
    if directory is None:
        raise ValueError(f"--megatron-dir {megatron_dir}: no checkpoint there (no "
                         f"{ckpt.TRACKER_FILE} and no metadata.json)")
    run_config = ckpt.read_run_config(directory)
    if not run_config.get("model"):
        raise ValueError(f"{directory / ckpt.RUN_CONFIG_FILE}: no model section")
    model = ModelConfig(**run_config["model"])
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    hf_config_from_model(model, run_config.get("hf"), "float32")  # refuses before any output
    tokenizer = _tokenizer_source(run_config, directory, tokenizer_dir)
    output = Path(output).resolve()
    with single_process_group(), torch.no_grad():
        try:
            saved = checkpoint_tensors(directory)
        except Exception as err:  # megatron/torch raise many types for a damaged metadata file
            raise ValueError(f"{directory}: cannot read the checkpoint's metadata "
                             f"({type(err).__name__}: {_last_line(err)})") from None
        if EMBEDDING not in saved:
            raise ValueError(f"{directory}: no {EMBEDDING!r}; not a GPT model checkpoint")
        padded_rows = saved[EMBEDDING].global_shape[0]
        if padded_rows < model.vocab_size:
            raise ValueError(f"{directory}: {padded_rows} embedding rows < model.vocab_size="
                             f"{model.vocab_size}")
        entries = canonical_tensors(model, padded_rows)
        check_checkpoint_matches(entries, saved, model.num_layers, directory)
        target = getattr(torch, dtype) if dtype else saved[EMBEDDING].dtype
        if target not in DTYPE_NAMES:
            raise ValueError(f"{directory}: weights are {target}; pass --dtype (one of {', '.join(DTYPES)})")
        config = hf_config_from_model(model, run_config.get("hf"), DTYPE_NAMES[target])
        for name in ("id2label", "label2id"):  # classification fields the source did not have
            if name not in (run_config.get("hf") or {}):
                config.pop(name, None)
        with atomic_output_dir(output) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_bytes)
            for key, key_entries in _by_key(entries).items():
                whole = _read_finite(directory, key, saved)  # [L, ...] for layer keys
                for entry in key_entries:
                    part = whole if entry.layer is None else whole[entry.layer]
                    for name, tensor in from_canonical(entry, part, model):
                        writer.add(name, tensor.to(target))
                del whole
            writer.finish()
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                copy_tokenizer_files(tokenizer, tmp)
            else:
                print(f"[convert] no tokenizer found for {directory} (pass --tokenizer-dir); the "
                      f"output has weights and config.json only", file=sys.stderr)
    source_dtype = (run_config.get("hf") or {}).get("torch_dtype") or \
        (run_config.get("hf") or {}).get("dtype")
    note = "" if dtype else " (the checkpoint's own; --dtype casts)"
    if source_dtype and source_dtype != DTYPE_NAMES[target]:
        note += f"; the original Hugging Face model was {source_dtype}"
    what = "converted release" if directory.name == ckpt.RELEASE else \
        f"iteration {int(directory.name.split('_')[-1])}"
    print(f"[convert] {directory} ({what}) -> {output}: {DTYPE_NAMES[target]}{note}", flush=True)
    return output
