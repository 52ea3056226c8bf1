"""Per-token log-probs of a Hugging Face model vs one of our checkpoints (tools/verify_conversion.py).

Both sides run in fp32, one after the other (the Hugging Face model is freed before ours is
built), ours single-process at TP=PP=1 with the reference attention on CPU. A correct conversion
agrees to float32 rounding (~1e-6); a layout mistake (QKV order, gate/up swap, RoPE) shows up as
differences of order 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

DEFAULT_PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Long-context models underuse what is in their context because",
)


@dataclasses.dataclass
class Comparison:
    num_sequences: int
    num_tokens: int
    max_abs_diff: float
    max_rel_diff: float

    def __str__(self) -> str:
        return (f"{self.num_sequences} sequences, {self.num_tokens} tokens: max abs diff "
                f"{self.max_abs_diff:.3e}, max rel diff {self.max_rel_diff:.3e}")


def pack_sequences(sequences: Sequence[Sequence[int]], pad_multiple: int = 1):
    """Token sequences as one PackedMicroBatch (data/batch.py contract) whose target mask covers
    every next-token target of every sequence."""
    from megatron_solopo.data.batch import PackedMicroBatch
    from megatron_solopo.roles import Role

    tokens, labels, targets, positions, cu, lengths = [], [], [], [], [0], []
    for ids in sequences:
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        length = int(ids.numel())
        if length < 2:
            raise ValueError("every sequence needs at least two tokens (one target)")
        padded = -(-length // pad_multiple) * pad_multiple
        seq_tokens = torch.zeros(padded, dtype=torch.long)
        seq_tokens[:length] = ids
        seq_labels = torch.zeros(padded, dtype=torch.long)
        seq_labels[:length - 1] = ids[1:]
        real = torch.zeros(padded)
        real[:length - 1] = 1
        tokens.append(seq_tokens)
        labels.append(seq_labels)
        targets.append(real)
        positions.append(torch.arange(padded))
        cu.append(cu[-1] + padded)
        lengths.append(length)
    count = len(lengths)
    return PackedMicroBatch(
        tokens=torch.cat(tokens), labels=torch.cat(labels), loss_mask=torch.cat(targets),
        target_mask=torch.cat(targets), position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        seq_lengths=torch.tensor(lengths, dtype=torch.int32),
        roles=torch.full((count,), Role.SHORT_CHOSEN.index), group_index=torch.arange(count),
        sample_indices=torch.arange(count), sample_ids=[f"seq-{i}" for i in range(count)],
        max_seqlen=max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True)))


def split_packed(values: torch.Tensor, batch) -> list[torch.Tensor]:
    """Per-sequence log-probs of the real targets (``[length - 1]`` each) from a packed ``[T]``."""
    return [values[start:start + length - 1]
            for start, length in zip(batch.cu_seqlens[:-1].tolist(), batch.seq_lengths.tolist(), strict=True)]


def hf_logprobs(hf_dir: str, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """transformers' own per-token log-probs (fp32, eager attention), one tensor per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            tokens = torch.tensor([list(ids)])
            logits = model(tokens).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, tokens[0, 1:, None])[:, 0])
    return out


def megatron_logprobs(megatron_dir: str, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Our model's per-token log-probs from a checkpoint (fp32, TP=PP=1, this process alone)."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.model.logprobs import forward_packed
    from megatron_solopo.parallel.distributed import (destroy_distributed, initialize_distributed,
                                                      single_process_env)
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt

    model_config = dataclasses.replace(ModelConfig(**ckpt.read_run_config(megatron_dir)["model"]),
                                       attention_backend="reference")
    created = not torch.distributed.is_initialized()
    initialize_distributed(ParallelConfig(), single_process_env())
    try:
        padded = model_config.padded_vocab_size(1)
        config = build_transformer_config(model_config, ParallelConfig(), perform_initialization=False)
        (model,) = build_model(model_config, config, padded_vocab_size=padded)
        ckpt.load_checkpoint(megatron_dir, [model], padded_vocab_size=padded)
        device = next(model.parameters()).device
        batch = pack_sequences(sequences)
        with torch.no_grad():
            logps = forward_packed(model.eval(), batch.to(device), model_config.vocab_size).cpu()
        return split_packed(logps, batch)
    finally:
        if created:
            destroy_distributed()


def compare(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> Comparison:
    ref = torch.cat([r.double().flatten() for r in reference])
    act = torch.cat([a.double().flatten() for a in actual])
    if ref.shape != act.shape:
        raise ValueError(f"log-prob counts differ: {tuple(ref.shape)} vs {tuple(act.shape)}")
    diff = (ref - act).abs()
    rel = diff / ref.abs().clamp(min=1e-6)
    return Comparison(len(reference), int(ref.numel()), float(diff.max()), float(rel.max()))


def tokenize_prompts(prompts: Sequence[str], tokenizer_dir: Optional[str], vocab_size: int,
                     seed: int = 0) -> list[list[int]]:
    """Token ids of the prompts with the tokenizer in ``tokenizer_dir``; random ids (one
    sequence per prompt) when there is no tokenizer."""
    directory = Path(tokenizer_dir) if tokenizer_dir else None
    if directory and ((directory / "tokenizer.json").exists() or (directory / "tokenizer.model").exists()):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        sequences = [tokenizer(prompt)["input_ids"] for prompt in prompts]
        too_short = [p for p, ids in zip(prompts, sequences, strict=True) if len(ids) < 2]
        if too_short:
            raise ValueError(f"prompts shorter than two tokens: {too_short}")
        return sequences
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (24 + 8 * i,), generator=generator).tolist()
            for i in range(len(prompts))]


def verify_conversion(hf_dir: str, megatron_dir: str, prompts: Sequence[str] = DEFAULT_PROMPTS,
                      tokenizer_dir: Optional[str] = None) -> Comparison:
    """Compare both sides on ``prompts`` (tokenized with ``tokenizer_dir``, default ``hf_dir``)."""
    from megatron_solopo.training import checkpoint as ckpt

    vocab_size = int(ckpt.read_run_config(megatron_dir)["model"]["vocab_size"])
    sequences = tokenize_prompts(prompts, tokenizer_dir or hf_dir, vocab_size)
    reference = hf_logprobs(hf_dir, sequences)
    return compare(reference, megatron_logprobs(megatron_dir, sequences))
