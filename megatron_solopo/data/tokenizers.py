"""Tokenizers with Megatron's type names, and how a record's turn becomes token ids.

A sequence is ``prompt ids + response ids``. The prompt is the whole user turn (system text,
context, question) in the model's chat format, ending where the assistant's answer starts; the
response is the answer followed by the end-of-sequence token, which is part of the response (the
model learns to stop). Only response tokens are in the loss mask.

- ``HuggingFaceTokenizer``: a directory loadable by ``transformers.AutoTokenizer`` (offline).
  With a chat template: ``apply_chat_template([system?, user: context + "\\n\\n" + prompt],
  add_generation_prompt=True)``. Without one: ``bos + [system "\\n\\n"] context "\\n\\n" prompt "\\n"``.
- ``SentencePieceTokenizer``: a ``.model`` file; the plain template above.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")
CONTEXT_SEPARATOR = "\n\n"


def files_fingerprint(paths: list[Path]) -> str:
    """sha256 over the names and bytes of tokenizer files (identity, independent of location)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def user_text(context: str, prompt: str) -> str:
    return f"{context}{CONTEXT_SEPARATOR}{prompt}" if context else prompt


class PreferenceTokenizer:
    """The interface the data pipeline uses."""

    tokenizer_type: str
    model_path: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: Optional[int]

    @property
    def name(self) -> str:
        return f"{self.tokenizer_type}:{os.path.basename(os.path.normpath(self.model_path))}"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def encode_prompt(self, system: Optional[str], context: str, prompt: str) -> list[int]:
        raise NotImplementedError

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A chat prompt given as messages (the last one a user turn), generation prompt added."""
        raise NotImplementedError

    def encode_response(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": self.tokenizer_type, "name": self.name, "fingerprint": self.fingerprint(),
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "bos_id": self.bos_id}


class SentencePieceTokenizer(PreferenceTokenizer):
    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_path: str):
        import sentencepiece

        if not Path(model_path).is_file():
            raise ValueError(f"--tokenizer-model {model_path}: no SentencePiece model file there")
        self.model_path = str(model_path)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = int(self.processor.get_piece_size())
        self.eos_id = int(self.processor.eos_id())
        self.bos_id = int(self.processor.bos_id()) if self.processor.bos_id() >= 0 else None
        pad = self.processor.pad_id()
        self.pad_id = int(pad) if pad >= 0 else self.eos_id
        if self.eos_id < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no EOS piece")

    def fingerprint(self) -> str:
        return files_fingerprint([Path(self.model_path)])

    def _text_prompt(self, text: str) -> list[int]:
        ids = self.processor.encode(text + "\n")
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def encode_prompt(self, system, context, prompt):
        text = user_text(context, prompt)
        if system:
            text = system + CONTEXT_SEPARATOR + text
        return self._text_prompt(text)

    def encode_messages(self, messages):
        return self._text_prompt(CONTEXT_SEPARATOR.join(m["content"] for m in messages))

    def encode_response(self, text):
        return self.processor.encode(text) + [self.eos_id]

    def decode(self, ids):
        return self.processor.decode(list(ids))


class HuggingFaceTokenizer(PreferenceTokenizer):
    tokenizer_type = "HuggingFaceTokenizer"
    _FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")

    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        if not Path(model_path).is_dir():
            raise ValueError(f"--tokenizer-model {model_path}: not a directory with Hugging Face "
                             f"tokenizer files")
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no eos_token; set one in "
                             f"tokenizer_config.json")
        self.vocab_size = len(self.tokenizer)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.bos_id = self.tokenizer.bos_token_id
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else self.eos_id)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def fingerprint(self) -> str:
        files = [Path(self.model_path) / name for name in self._FILES
                 if (Path(self.model_path) / name).is_file()]
        return files_fingerprint(files)

    def encode_messages(self, messages):
        if self.has_chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer versions
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = CONTEXT_SEPARATOR.join(m["content"] for m in messages) + "\n"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids)

    def encode_prompt(self, system, context, prompt):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user_text(context, prompt)})
        return self.encode_messages(messages)

    def encode_response(self, text):
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids))


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> PreferenceTokenizer:
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; valid: "
                     f"{', '.join(TOKENIZER_TYPES)}")
