"""Shared helpers for the data pipeline tests (tests/unit/test_data_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_solopo.data import synthetic

SP = "SentencePieceTokenizer"
HF = "HuggingFaceTokenizer"

_TOKENIZERS: dict = {}  # trained once per test session, whichever module asks first


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict:
    """``{SP: path of a .model, HF: tokenizer directory}``, trained on the synthetic corpus."""
    if not _TOKENIZERS:
        root = tmp_path_factory.mktemp("tokenizers")
        _TOKENIZERS[SP] = synthetic.train_sentencepiece_tokenizer(str(root / "sp"), 200)
        _TOKENIZERS[HF] = synthetic.make_hf_tokenizer(str(root / "hf"), 300)
    return dict(_TOKENIZERS)


def record(index: int = 0, **overrides) -> dict:
    """A small valid single-turn record; ``overrides`` replace or add fields."""
    data = {"id": f"r{index}", "prompt": f"What is item {index}?", "short_context": "item is red",
            "long_context": "filler text. " * 20 + "item is red", "chosen": "It is red.",
            "rejected": "I do not know."}
    data.update(overrides)
    return data


def multi_turn_record(index: int = 0, num_turns: int = 2) -> dict:
    return {"id": f"m{index}", "long_context": "the long document. " * 30, "system": "Be brief.",
            "turns": [{"prompt": f"Question {t}?", "short_context": f"chunk {t} of the document",
                       "chosen": f"Answer {t}.", "rejected": f"Wrong {t}."}
                      for t in range(num_turns)]}


def write_lines(path: Path, lines) -> str:
    """JSONL from dicts (serialized) or bytes (written as they are)."""
    with open(path, "wb") as handle:
        for line in lines:
            handle.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def outputs(prefix) -> list[str]:
    """Every file in the prefix's directory whose name starts with the prefix's name."""
    prefix = Path(prefix)
    if not prefix.parent.exists():
        return []
    return sorted(p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name))
