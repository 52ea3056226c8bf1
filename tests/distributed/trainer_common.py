"""A tiny preference dataset, starting checkpoint and reference cache for trainer tests, and the
functions that run inside gloo ranks (tests/harness.py)."""

from __future__ import annotations

import contextlib
import copy
import io
from contextlib import redirect_stdout
from pathlib import Path

from megatron_solopo.config import config_from_dict

TINY_MODEL = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                  num_attention_heads=4, num_query_groups=2, max_position_embeddings=1024)


def make_dataset(root: Path, num_records: int = 48, long_length: int = 120) -> dict:
    """Tokenizer + train/valid datasets (single process, no torch.distributed)."""
    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = synthetic.train_sentencepiece_tokenizer(str(root / "tok"), vocab_size=200)
    paths = {"tokenizer": tokenizer}
    for split, count, seed in (("train", num_records, 1), ("valid", 16, 2)):
        records = synthetic.generate_records("kv_retrieval", count, seed=seed, long_length=long_length)
        synthetic.write_jsonl(records, str(root / f"{split}.jsonl"))
        preprocess([str(root / f"{split}.jsonl")], str(root / split), "SentencePieceTokenizer",
                   tokenizer)
        paths[split] = str(root / split)
    return paths


def base_config(paths: dict, workdir: str, **sections) -> dict:
    raw = {
        "model": dict(TINY_MODEL),
        "tokenizer": {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": paths["tokenizer"]},
        "data": {"train_prefix": paths["train"], "max_tokens_per_micro_batch": 600},
        "objective": {"name": "solopo", "base": "dpo", "beta": 0.5, "alpha": 1.0},
        "reference": {"mode": "precomputed", "checkpoint": paths.get("init")},
        "checkpoint": {"load": paths.get("init")},
        "training": {"train_iters": 4, "global_batch_size": 8, "seed": 7},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.01, "clip_grad": 1.0},
        "scheduler": {"lr_warmup_iters": 1, "lr_decay_style": "cosine"},
        "logging": {"log_interval": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {})
        if section == "objective":
            raw[section] = dict(values)
        else:
            raw[section].update(values)
    return raw


def prepare_starting_point(raw: dict, init_dir: str) -> None:
    """Rank function (world 1): random-init checkpoint, then reference caches for train/valid."""
    from megatron_solopo.training.model_setup import write_initial_checkpoint
    from megatron_solopo.training.precompute import precompute_reference

    config = config_from_dict(raw)
    write_initial_checkpoint(config, init_dir)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    raw = copy.deepcopy(raw)
    raw["reference"]["checkpoint"] = init_dir
    raw["checkpoint"]["load"] = init_dir
    with redirect_stdout(io.StringIO()):
        precompute_reference(config_from_dict(raw))


def train(raw: dict, capture: bool = False, patch=None) -> dict:
    """Rank function: build the Trainer, run it, return its history (logging rank) and output."""
    from megatron_solopo.training.trainer import Trainer

    trainer = Trainer(config_from_dict(raw))
    buffer = io.StringIO()
    with redirect_stdout(buffer) if capture else contextlib.nullcontext():
        trainer.setup()
        if patch is not None:
            patch(trainer)
        summary = trainer.train()
    losses = [row["loss"] for row in summary["history"] if "loss" in row and not row.get("eval")]
    return {"losses": losses, "history": summary["history"], "output": buffer.getvalue(),
            "logging_rank": trainer.is_logging_rank, "num_skipped": summary["num_skipped"]}


def logging_result(results: list) -> dict:
    (result,) = [r for r in results if r["logging_rank"]]
    return result


def write_initial(raw: dict, output: str) -> None:
    """Rank function (world 1): a random-init checkpoint from ``raw``'s model and seed."""
    from megatron_solopo.training.model_setup import write_initial_checkpoint

    write_initial_checkpoint(config_from_dict(raw), output)
