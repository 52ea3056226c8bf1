"""Compare per-token log-probs of a Hugging Face model and our checkpoint (tools/verify_conversion.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
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
        return (f"{self.num_sequences} sequences, {self.num_tokens} tokens: max |diff| "
                f"{self.max_abs_diff:.3e}, max relative diff {self.max_rel_diff:.3e}")


def pack_sequences(sequences: Sequence[Sequence[int]], pad_multiple: int = 1, pad_token_id: int = 0):
    """Token sequences as one packed micro-batch whose loss mask covers every next-token target."""
    from megatron_solopo.data.dataset import PreferenceGroup
    from megatron_solopo.data.packing import pack_groups
    from megatron_solopo.roles import Role

    groups = [PreferenceGroup(i, f"seq-{i}", {Role.SHORT_CHOSEN: [
        (np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool))]})
        for i, ids in enumerate(sequences)]
    return pack_groups(groups, [Role.SHORT_CHOSEN], pad_multiple, pad_token_id)


def hf_logprobs(hf_dir: str, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """transformers' own per-token log-probs (fp32, eager attention), one tensor per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            tokens = torch.tensor([list(ids)])
            logits = model(tokens).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, tokens[0, 1:, None])[:, 0])
    return out


def split_packed(values: torch.Tensor, batch) -> list[torch.Tensor]:
    """Per-sequence log-probs (of the real targets) from a packed ``[T]`` tensor."""
    out = []
    for start, length in zip(batch.cu_seqlens[:-1].tolist(), batch.seq_lengths.tolist()):
        out.append(values[start:start + length - 1])
    return out


def megatron_logprobs(megatron_dir: str, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Our model's per-token log-probs (fp32, TP=PP=1, single process)."""
    from megatron_solopo.convert.checkpoints import build_unsharded_model, single_process_megatron
    from megatron_solopo.model.config import ModelConfig
    from megatron_solopo.model.logprobs import forward_packed
    from megatron_solopo.training import checkpoint as ckpt

    model = ModelConfig(**ckpt.read_run_config(megatron_dir)["model"])
    with single_process_megatron(), torch.no_grad():
        padded = model.padded_vocab_size(1)
        (chunk,) = build_unsharded_model(model, torch.float32, padded)
        ckpt.load_checkpoint(megatron_dir, [chunk], padded_vocab_size=padded)
        batch = pack_sequences(sequences)
        return split_packed(forward_packed(chunk, batch, model.vocab_size), batch)


def compare(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> Comparison:
    ref = torch.cat([r.double() for r in reference])
    act = torch.cat([a.double() for a in actual])
    diff = (ref - act).abs()
    rel = diff / ref.abs().clamp(min=1e-6)
    return Comparison(len(reference), int(ref.numel()), float(diff.max()), float(rel.max()))


def tokenize_prompts(hf_dir: str, prompts: Sequence[str], vocab_size: int,
                     tokenizer_dir: Optional[str] = None) -> list[list[int]]:
    """Token ids of the prompts with the checkpoint's tokenizer; random ids when it has none."""
    directory = Path(tokenizer_dir or hf_dir)
    if (directory / "tokenizer.json").exists() or (directory / "tokenizer.model").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return [tokenizer(p)["input_ids"] for p in prompts]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (24 + 8 * i,), generator=generator).tolist()
            for i in range(len(prompts))]
