"""Throughput accounting and the log outputs: Megatron's per-iteration line, TensorBoard, W&B."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Sequence

import torch

from megatron_solopo.model.config import ModelConfig

logger = logging.getLogger("megatron_solopo")


def forward_flops(model: ModelConfig, sequence_lengths: Sequence[int], num_logprob_positions: int,
                  padded_vocab_size: int,
                  branch_bounds: Optional[Sequence[Sequence[int]]] = None) -> float:
    """Forward FLOPs of the model on a set of packed sequences.

    Dense layers cost ``2 * params`` per token. Attention scores and their weighted sum cost
    ``2 * 2 * q_dim`` per (query, key) pair per layer; a causal *packed sequence* of length L has
    ``L^2 / 2`` pairs, so packing many short sequences is not billed as one long one. A
    shared-prefix segment ``[prefix | chosen | rejected]`` (``branch_bounds`` ``(a, b)``: the
    chosen branch at ``[a, b)``, data/batch.py) has ``b^2/2`` pairs for ``[prefix | chosen]`` plus
    ``(L - b) * a + (L - b)^2 / 2`` for the rejected branch, which sees the prefix and itself. The
    LM head runs only on the positions whose log-prob is needed (model/logprobs.py).
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    q_dim = model.num_attention_heads * model.kv_channels
    kv_dim = model.num_query_groups * model.kv_channels
    dense_per_token = 2 * model.num_layers * (h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * f)
    num_tokens = sum(sequence_lengths)
    bounds = branch_bounds if branch_bounds is not None else [(n, n) for n in sequence_lengths]
    pairs = sum(b * b / 2 + (n - b) * a + (n - b) * (n - b) / 2
                for n, (a, b) in zip(sequence_lengths, bounds))
    attention = model.num_layers * 4 * q_dim * pairs
    head = 2 * h * padded_vocab_size * num_logprob_positions
    return float(dense_per_token * num_tokens + attention + head)


def memory_line() -> str:
    if torch.cuda.is_available():
        mib = 1024 * 1024
        return (f"[memory after first iteration] allocated: {torch.cuda.memory_allocated() / mib:.1f}"
                f" MiB | max allocated: {torch.cuda.max_memory_allocated() / mib:.1f} MiB | "
                f"reserved: {torch.cuda.memory_reserved() / mib:.1f} MiB | max reserved: "
                f"{torch.cuda.max_memory_reserved() / mib:.1f} MiB")
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss / (1024 * 1024)
    return f"[memory after first iteration] host RSS: {rss:.1f} MiB (no GPU)"


class MetricWriters:
    """TensorBoard and W&B, on the logging rank only; both optional."""

    def __init__(self, tensorboard_dir: Optional[str], wandb_project: Optional[str],
                 wandb_name: Optional[str], run_config: dict, enabled: bool,
                 metrics_jsonl: Optional[str] = None):
        self.tensorboard = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        if metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_jsonl)), exist_ok=True)
            self.jsonl = open(metrics_jsonl, "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("logging.wandb_project is set but wandb is not installed; skipping")
            else:
                self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=run_config)

    def write(self, values: dict, step: int) -> None:
        scalars = {name: float(value) for name, value in values.items()
                   if isinstance(value, (int, float)) and math.isfinite(float(value))}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(dict(scalars, iteration=step)) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
