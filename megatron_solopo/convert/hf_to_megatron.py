"""Hugging Face (Llama / Qwen2 / Qwen3 / Mistral safetensors) -> our weights-only Megatron checkpoint.

Output (written into a temporary directory beside ``output``, renamed at the end)::

    <output>/latest_checkpointed_iteration.txt   "release"
    <output>/release/                             torch_dist shards + metadata.json + run_config.yaml
    <output>/tokenizer/                           the Hugging Face tokenizer files (+ generation_config.json)

No Megatron model is built: each canonical tensor is made from its Hugging Face tensors (opened
lazily and memory-mapped) in the source dtype and handed to dist_checkpointing as the
ShardedTensors a TP=PP=1 model would write (convert/sharded.py). Tensors that pass through
unchanged stay memory-mapped file pages; only fused QKV and padded vocabulary rows are new
memory, so the peak is about one copy of the model (measured 1.4x for a 7B model, counting the
mapped inputs: docs/conversion.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch

from megatron_solopo.convert.hf_config import dtype_name, model_config_from_hf
from megatron_solopo.convert.hf_io import (TOKENIZER_FILES, SafetensorsReader, atomic_output_dir,
                                           copy_tokenizer_files, read_json)
from megatron_solopo.convert.sharded import CanonicalChunk, single_process_group
from megatron_solopo.convert.weights import (IGNORED_HF_SUFFIXES, canonical_tensors, hf_shapes,
                                             hf_sources, to_canonical_parts)
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.parallel.layout import ParallelConfig, validate_parallel_layout

TOKENIZER_DIR = "tokenizer"


def read_hf_config(hf_dir: Union[str, Path]) -> tuple[dict, ModelConfig]:
    """The raw config.json and our ModelConfig for it (ValueError naming anything unsupported)."""
    config_path = Path(hf_dir) / "config.json"
    if not config_path.exists():
        raise ValueError(f"--hf-dir {hf_dir}: no config.json (expected a Hugging Face model directory)")
    hf_config = read_json(config_path)
    return hf_config, model_config_from_hf(hf_config, str(config_path))


def _check_hf_tensors(reader: SafetensorsReader, model: ModelConfig, hf_dir) -> set[str]:
    """Every tensor the config implies is there with its shape, and nothing we would drop.
    Returns the names read."""
    expected = hf_shapes(model)
    for name, shape in expected.items():
        if name not in reader:
            raise ValueError(f"--hf-dir {hf_dir}: tensor {name!r} is missing (config.json implies it)")
        if reader.shape(name) != shape:
            raise ValueError(f"--hf-dir {hf_dir}: tensor {name!r} has shape {reader.shape(name)}, "
                             f"config.json implies {shape}")
    # A tensor we do not map is a feature we do not model (e.g. q/k norms): refuse, don't drop.
    tied_copy = {"lm_head.weight"} if not model.untie_embeddings_and_output_weights else set()
    unknown = [name for name in reader.names() if name not in expected and name not in tied_copy
               and not name.endswith(IGNORED_HF_SUFFIXES)]
    if unknown:
        raise ValueError(f"--hf-dir {hf_dir}: tensors with no place in a {model.family} model "
                         f"(a feature we do not model): {unknown[:8]}")
    return set(expected)


def hf_to_megatron(hf_dir: Union[str, Path], output: Union[str, Path], *,
                   tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1) -> Path:
    """Convert a Hugging Face checkpoint directory into a release checkpoint at ``output``.

    The parallel sizes are validated against the model and recorded; the checkpoint loads under
    any layout, so they decide only the vocabulary padding (a multiple of 128 * TP).
    """
    from megatron_solopo.training import checkpoint as ckpt

    hf_dir = Path(hf_dir)
    hf_config, model = read_hf_config(hf_dir)
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                              pipeline_model_parallel_size=pipeline_model_parallel_size)
    validate_parallel_layout(parallel, tensor_model_parallel_size * pipeline_model_parallel_size,
                             num_layers=model.num_layers,
                             num_attention_heads=model.num_attention_heads,
                             num_query_groups=model.num_query_groups)
    reader = SafetensorsReader(hf_dir)
    _check_hf_tensors(reader, model, hf_dir)
    padded_vocab_size = model.padded_vocab_size(tensor_model_parallel_size)
    output = Path(output).resolve()
    with atomic_output_dir(output) as tmp, single_process_group(), torch.no_grad():
        tensors = {}
        for entry in canonical_tensors(model, padded_vocab_size):
            # Source dtype kept (no cast), so HF -> ours -> HF is bit for bit.
            tensors[entry] = to_canonical_parts(entry, [reader.get(n) for n in hf_sources(entry)],
                                                model)
        copied = copy_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
        run_config = {
            "model": dataclasses.asdict(model),
            "padded_vocab_size": padded_vocab_size,
            "parallel": {"tensor_model_parallel_size": tensor_model_parallel_size,
                         "pipeline_model_parallel_size": pipeline_model_parallel_size},
            "hf": hf_config,
            "converted_from": str(hf_dir.resolve()),
        }
        if set(copied) & set(TOKENIZER_FILES):
            run_config["tokenizer"] = {"tokenizer_type": "HuggingFaceTokenizer",
                                       "tokenizer_model": str(output / TOKENIZER_DIR)}
        ckpt.save_checkpoint(tmp, ckpt.RELEASE, [CanonicalChunk(tensors, model.num_layers)],
                             run_config)
        del tensors
    return output


def describe(output: Path) -> str:
    """One line for the CLI."""
    from megatron_solopo.training import checkpoint as ckpt

    run_config = ckpt.read_run_config(output)
    model = run_config["model"]
    return (f"wrote {output}: {model['family']}, {model['num_layers']} layers, hidden "
            f"{model['hidden_size']}, vocab {model['vocab_size']} (padded to "
            f"{run_config['padded_vocab_size']}), dtype {dtype_name(run_config['hf'])}, tokenizer "
            f"{'copied' if run_config.get('tokenizer') else 'none found'}")
