"""Hugging Face <-> Megatron checkpoints (tools/convert_checkpoint.py is the CLI).

Both directions go through a single-process Megatron model (TP=PP=1, built without
initialization, in the checkpoint's own dtype) whose ``sharded_state_dict`` defines the
checkpoint keys, so what we write is exactly what a model of any layout asks for when it loads.
Weights are streamed: one model copy in memory plus one Hugging Face tensor (or one output shard)
at a time, about 1x-2x the model size. Outputs are written to a temporary directory beside the
destination and renamed into place at the end.

Output of ``hf_to_megatron``::

    <output>/latest_checkpointed_iteration.txt   "release"
    <output>/release/                             dist checkpoint (torch_dist) + run_config.yaml
    <output>/tokenizer/                           the Hugging Face tokenizer files (+ generation_config.json)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_solopo.convert.hf_config import (dtype_name, hf_config_from_model,
                                               model_config_from_hf)
from megatron_solopo.convert.weights import (SafetensorsReader, canonical_from_hf,
                                             hf_from_canonical)
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.parallel.layout import ParallelConfig, validate_parallel_layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: Union[str, int]) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    for suffix, factor in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9),
                           ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if value.endswith(suffix):
            return int(float(value[:-len(suffix)]) * factor)
    return int(value)


@contextlib.contextmanager
def single_process_megatron():
    from megatron_solopo.parallel.distributed import (destroy_distributed, initialize_distributed,
                                                      single_process_env)

    initialize_distributed(ParallelConfig(), single_process_env())
    try:
        yield
    finally:
        destroy_distributed()


def build_unsharded_model(model: ModelConfig, dtype: torch.dtype, padded_vocab_size: int) -> list:
    """One GPTModel (TP=PP=1), parameters allocated but not initialized (they are overwritten)."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config

    config = build_transformer_config(
        model, ParallelConfig(), perform_initialization=False, params_dtype=dtype,
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    return build_model(model, config, padded_vocab_size=padded_vocab_size,
                       attention_backend="reference")


def _prepare_output(output: Path) -> Path:
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; choose a new directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _finish_output(tmp: Path, output: Path) -> None:
    if output.exists():
        output.rmdir()  # empty (checked in _prepare_output)
    os.replace(tmp, output)


def _copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    if source.is_file():  # a SentencePiece model
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / "tokenizer.model")
        return ["tokenizer.model"]
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def hf_to_megatron(hf_dir: str, output: str, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1) -> Path:
    """Convert a Hugging Face Llama/Qwen2/Mistral checkpoint into a weights-only checkpoint."""
    from megatron_solopo.model.state import VOCAB_KEYS, resize_vocab_rows, sharded_tensors
    from megatron_solopo.training import checkpoint as ckpt

    hf_dir_path = Path(hf_dir)
    config_path = hf_dir_path / "config.json"
    if not config_path.exists():
        raise ValueError(f"--hf-dir {hf_dir}: no config.json")
    hf_config = json.loads(config_path.read_text())
    model = model_config_from_hf(hf_config, str(config_path))
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                              pipeline_model_parallel_size=pipeline_model_parallel_size)
    validate_parallel_layout(parallel, tensor_model_parallel_size * pipeline_model_parallel_size,
                             num_layers=model.num_layers,
                             num_attention_heads=model.num_attention_heads,
                             num_query_groups=model.num_query_groups)
    dtype_text = dtype_name(hf_config)
    if dtype_text not in DTYPES:
        raise ValueError(f"{config_path}: dtype {dtype_text!r} is not supported "
                         f"({', '.join(DTYPES)})")
    reader = SafetensorsReader(hf_dir)
    padded = model.padded_vocab_size(tensor_model_parallel_size)
    output_path = Path(output).resolve()
    tmp = _prepare_output(output_path)
    try:
        with single_process_megatron(), torch.no_grad():
            chunks = build_unsharded_model(model, DTYPES[dtype_text], padded)
            for sharded in sharded_tensors(chunks):
                layer = sharded.global_offset[0] if sharded.prepend_axis_num else None
                source = canonical_from_hf(sharded.key, layer, reader, model)
                if sharded.key in VOCAB_KEYS:
                    source = resize_vocab_rows(source, padded)
                target_slice = sharded.global_slice()[sharded.prepend_axis_num:]
                expected = tuple(sharded.global_shape[sharded.prepend_axis_num:])
                if tuple(source.shape) != expected:
                    raise ValueError(f"{hf_dir}: weight {sharded.key} (layer {layer}) has shape "
                                     f"{tuple(source.shape)}, the config implies {expected}")
                sharded.data.copy_(source[target_slice])
            tokenizer_files = _copy_tokenizer(hf_dir_path, tmp / "tokenizer")
            run_config = {
                "model": dataclasses.asdict(model),
                "padded_vocab_size": padded,
                "parallel": dataclasses.asdict(parallel),
                "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer",
                              "tokenizer_model": str(output_path / "tokenizer")}
                if tokenizer_files else None,
                "hf": hf_config,
                "converted_from": str(hf_dir_path.resolve()),
            }
            ckpt.save_checkpoint(tmp, ckpt.RELEASE, chunks, run_config)
        _finish_output(tmp, output_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_path


class _ShardWriter:
    """Safetensors shards of at most ``max_bytes`` (a single larger tensor gets its own)."""

    def __init__(self, directory: Path, max_bytes: int, metadata: dict):
        self.directory = directory
        self.max_bytes = max_bytes
        self.metadata = metadata
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().cpu().contiguous().clone()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata=self.metadata)
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0][0], self.directory / "model.safetensors")
            return
        weight_map = {}
        for index, (name, tensors) in enumerate(self.files):
            final = f"model-{index + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.directory / name, self.directory / final)
            weight_map.update({tensor: final for tensor in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def megatron_to_hf(megatron_dir: str, output: str, *, max_shard_size: Union[str, int] = "5GB",
                   dtype: Optional[str] = None) -> Path:
    """Convert any of our checkpoints (any saved layout) to a Hugging Face directory."""
    from megatron_solopo.model.state import VOCAB_KEYS, sharded_tensors
    from megatron_solopo.training import checkpoint as ckpt

    run_config = ckpt.read_run_config(megatron_dir)
    if "model" not in run_config:
        raise ValueError(f"{megatron_dir}: run_config.yaml has no model section")
    model = ModelConfig(**run_config["model"])
    hf_original = run_config.get("hf")
    if dtype is None:
        if hf_original:
            dtype = dtype_name(hf_original)
        else:
            dtype = "bfloat16" if (run_config.get("precision") or {}).get("bf16") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    output_path = Path(output).resolve()
    tmp = _prepare_output(output_path)
    try:
        with single_process_megatron(), torch.no_grad():
            padded = model.padded_vocab_size(1)
            chunks = build_unsharded_model(model, DTYPES[dtype], padded)
            if ckpt.load_checkpoint(megatron_dir, chunks, padded_vocab_size=padded) is None:
                raise ValueError(f"--megatron-dir {megatron_dir}: no checkpoint there")
            writer = _ShardWriter(tmp, parse_size(max_shard_size), {"format": "pt"})
            # Assemble each (key, layer) from its shards (SwiGLU's fc1 comes as two halves).
            pieces: dict = {}
            for sharded in sharded_tensors(chunks):
                layer = sharded.global_offset[0] if sharded.prepend_axis_num else None
                entry = pieces.setdefault((sharded.key, layer), {
                    "shape": tuple(sharded.global_shape[sharded.prepend_axis_num:]), "parts": []})
                entry["parts"].append((sharded.global_slice()[sharded.prepend_axis_num:], sharded.data))
            for (key, layer), entry in pieces.items():
                parts = entry["parts"]
                if len(parts) == 1 and tuple(parts[0][1].shape) == entry["shape"]:
                    full = parts[0][1]
                else:
                    full = torch.empty(entry["shape"], dtype=parts[0][1].dtype)
                    for target_slice, data in parts:
                        full[target_slice] = data
                if key in VOCAB_KEYS:
                    full = full[:model.vocab_size]
                for name, tensor in hf_from_canonical(key, layer, full, model):
                    writer.add(name, tensor)
            writer.finish()
        config = hf_config_from_model(model, hf_original, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer = (run_config.get("tokenizer") or {}).get("tokenizer_model")
        if tokenizer and Path(tokenizer).exists():
            _copy_tokenizer(Path(tokenizer), tmp)
        _finish_output(tmp, output_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_path
